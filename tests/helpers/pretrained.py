"""A tiny GLIP trained through the real CLI (``glip-pl fit`` in a subprocess) on the synthetic shards: the recipe of
the runs that validate by box AP, and the one pre-trained checkpoint that several slow tests share
(``pretrained_tiny`` in conftest.py) — the transfer tests fine-tune it, the pseudo-label quality test uses it as the
teacher."""

from __future__ import annotations

import re
from pathlib import Path

from helpers.cli import glip_pl
from helpers.recipe import Recipe, checkpoint, tiny_recipe

VAL_BATCHES = 8  # 16 of the 32 val images at batch 2
AP_LINE = re.compile(r"\[glip_pl\] step (\d+): val box AP ([0-9.]+)")
# The shared pre-training: 300 steps of batch 4 at 192 px (synthetic scenes are 256 px), the demo's lr schedule.
# Measured (one seed): box AP 0.32 on the val split; 150 steps of batch 2 at 128 px (the earlier budget, ~1/4 the
# cost) reached 0.04-0.12, too weak to tell the classes apart by their names, so a new prompt had nothing to read.
# experiments/label_students.py trains its teacher with the same config (it cannot import tests/): keep them equal.
PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_SIZE = 300, 4, 192
SIZE = 160  # image side of the runs that start from it (transfer, pseudo-labelling): cheaper, still readable


def recipe(tmp: Path, name: str, shards: str, *, steps: int, model: dict, train: list, val_first: bool,
           validate: bool = True, val: dict | None = None, size: int = SIZE, batch_size: int = 2,
           negatives: int = 4, clip: float | None = None, train_sizes: list | None = None) -> Recipe:
    """A run of ``steps`` that validates (box AP on VAL_BATCHES of the detection val split) after its last step and,
    with ``val_first``, before its first; ``model`` and ``train`` as the recipe's sections."""
    val_batches = VAL_BATCHES * 2 // batch_size
    return tiny_recipe(
        tmp, shards, name, steps=steps,
        trainer={"log_every_n_steps": 5, "val_check_interval": steps, "check_val_every_n_epoch": None,
                 "gradient_clip_val": clip, "limit_val_batches": val_batches if validate else 0,
                 "num_sanity_val_steps": val_batches if val_first else 0, "logger": False,
                 "callbacks": [checkpoint(tmp / name, save_top_k=0,
                                          cls="lightning.pytorch.callbacks.ModelCheckpoint")]},
        model=model,
        data={"train": train, "val": [{"urls": f"{shards}/detection", "split": "val", **(val or {})}],
              "batch_size": batch_size, "num_workers": 1, "train_min_sizes": list(train_sizes or [size]),
              "train_max_size": max(train_sizes or [size]), "val_size": size, "val_max_size": size,
              "num_negatives": negatives})


def fit(cfg: Recipe, timeout=600, validate=True):
    """([(step, val box AP)], last.ckpt) of ``glip-pl fit`` on the recipe."""
    r = glip_pl("fit", *cfg.args, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    aps = [(int(s), float(a)) for s, a in AP_LINE.findall(r.stdout)]
    assert aps or not validate, r.stdout[-2000:]
    return aps, cfg.run / "checkpoints" / "last.ckpt"


def pretrain(tmp: Path, shards: str, train_sizes: list | None = None) -> Path:
    """PRETRAIN_STEPS of batch 4 at 192 px (or a side drawn from ``train_sizes`` per sample) on synthetic detection
    (sampled prompts, 8 negatives) + grounding, with the demo recipe's lr, step schedule and gradient clipping."""
    cfg = recipe(tmp, "pretrain", shards, steps=PRETRAIN_STEPS, val_first=False, validate=False,
                 size=PRETRAIN_SIZE, batch_size=PRETRAIN_BATCH, negatives=8, clip=1.0, train_sizes=train_sizes,
                 model={"preset": "tiny", "lr": 1e-3, "lang_lr": 1e-3, "warmup_steps": 5, "schedule": "step"},
                 train=[{"urls": f"{shards}/detection"}, {"urls": f"{shards}/grounding"}])
    _, ckpt = fit(cfg, validate=False)
    return ckpt
