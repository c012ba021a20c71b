"""A tiny GLIP trained through the real CLI (``glip-pl fit`` in a subprocess) on the synthetic shards: the recipe
builder and the one pre-trained checkpoint that several slow tests share (``pretrained_tiny`` in conftest.py) —
the transfer tests fine-tune it, the pseudo-label quality test uses it as the teacher."""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

VAL_BATCHES = 8  # 16 of the 32 val images
AP_LINE = re.compile(r"\[glip_pl\] step (\d+): val box AP ([0-9.]+)")
PRETRAIN_STEPS = 150
SIZE = 128  # train and val image side of these runs (synthetic scenes are 256 px)


def recipe(tmp: Path, name: str, shards: str, *, steps: int, model: dict, train: list, val_first: bool,
           validate: bool = True, val: dict | None = None) -> Path:
    run = tmp / name
    cfg = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": steps, "log_every_n_steps": 5,
            "val_check_interval": steps, "check_val_every_n_epoch": None,
            "limit_val_batches": VAL_BATCHES if validate else 0,
            "num_sanity_val_steps": VAL_BATCHES if val_first else 0, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(run), "logger": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "save_top_k": 0}}],
        },
        "model": model,
        "data": {
            "train": train, "val": [{"urls": f"{shards}/detection", "split": "val", **(val or {})}],
            "batch_size": 2,
            "num_workers": 1, "train_min_sizes": [SIZE], "train_max_size": 160, "val_size": SIZE, "val_max_size": 160,
            "num_negatives": 4,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def glip_pl(*args, timeout=600) -> subprocess.CompletedProcess:
    """``glip-pl ARGS`` in a subprocess, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "glip_pl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def fit(cfg: Path, timeout=600, validate=True):
    r = glip_pl("fit", "--config", str(cfg), timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    aps = [(int(s), float(a)) for s, a in AP_LINE.findall(r.stdout)]
    assert aps or not validate, r.stdout[-2000:]
    return aps, cfg.parent / cfg.stem / "checkpoints" / "last.ckpt"


def pretrain(tmp: Path, shards: str) -> Path:
    """PRETRAIN_STEPS of batch 2 at 128 px on synthetic detection (sampled prompts with negatives) + grounding."""
    cfg = recipe(tmp, "pretrain", shards, steps=PRETRAIN_STEPS, val_first=False, validate=False,
                 model={"preset": "tiny", "lr": 2e-3, "lang_lr": 2e-3, "warmup_steps": 5, "schedule": "constant"},
                 train=[{"urls": f"{shards}/detection"}, {"urls": f"{shards}/grounding"}])
    _, ckpt = fit(cfg, validate=False)
    return ckpt
