"""The tests' training recipe: ``recipes/local/cpu_smoke.yaml`` with a test's delta stacked on top by the CLI
(``--config cpu_smoke.yaml --config <delta>.yaml``), so a change to the smoke recipe reaches every test that trains.

The delta turns the smoke run into a resumable test run: seed 7, a few steps on 64–128 px images of batch 2, no
validation, no gradient clipping, CSV metrics (one file per start), atomic checkpoints every ``every`` steps (the
newest 2 kept) and the preemption callback, all paths under the test's tmp folder. A test passes what it needs
on top: dicts merge key by key, lists (callbacks, sources) replace the smoke recipe's.

What the smoke recipe still decides: accelerator and devices, precision, the model preset, lr 1e-3 for both
towers, weight decay and the step schedule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

CPU_SMOKE = Path(__file__).resolve().parents[2] / "recipes" / "local" / "cpu_smoke.yaml"


@dataclass(frozen=True)
class Recipe:
    delta: Path  # the test's overrides; the smoke recipe is the first config
    run: Path  # trainer.default_root_dir

    @property
    def configs(self) -> list[str]:
        """The config files in stacking order (``scripts/slurm/pretrain.sh`` takes them as arguments)."""
        return [str(CPU_SMOKE), str(self.delta)]

    @property
    def args(self) -> list[str]:
        return [a for c in self.configs for a in ("--config", c)]


def checkpoint(run: Path, every: int | None = None, cls: str = "glip_pl.lit.checkpointing.AtomicModelCheckpoint",
               **init_args) -> dict:
    args = {"dirpath": str(run / "checkpoints"), "save_last": True, "save_top_k": -1}
    if every is not None:
        args["every_n_train_steps"] = every
    return {"class_path": cls, "init_args": {**args, **init_args}}


def batch_trace(out_dir: Path, **init_args) -> dict:
    return {"class_path": "glip_pl.lit.callbacks.BatchTrace", "init_args": {"out_dir": str(out_dir), **init_args}}


PREEMPTION = {"class_path": "glip_pl.lit.checkpointing.PreemptionCheckpoint"}


def csv_logger(run: Path) -> dict:
    return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run)}}


def wandb_logger(run: Path) -> dict:
    return {"class_path": "glip_pl.lit.logging.GLIPWandbLogger", "init_args": {"save_dir": str(run)}}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_recipe(tmp: Path, shards: str, name: str = "run", *, steps: int = 6, every: int = 3, seed: int = 7,
                trainer: dict | None = None, model: dict | None = None, data: dict | None = None) -> Recipe:
    """``<tmp>/<name>.yaml`` (the delta) for a run in ``<tmp>/<name>`` on the synthetic shards at ``shards``."""
    run = tmp / name
    delta = {
        "seed_everything": seed,
        "trainer": {"max_steps": steps, "log_every_n_steps": 1, "gradient_clip_val": None, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "enable_model_summary": False, "default_root_dir": str(run),
                    "logger": csv_logger(run), "callbacks": [checkpoint(run, every, keep_last=2), PREEMPTION]},
        "model": {"warmup_steps": 2},
        "data": {"train": [{"urls": f"{shards}/detection"}, {"urls": f"{shards}/grounding"}], "val": None,
                 "batch_size": 2, "num_workers": 0, "train_min_sizes": [64, 96], "train_max_size": 128,
                 "num_negatives": 4},
    }
    delta = _merge(delta, {"trainer": trainer or {}, "model": model or {}, "data": data or {}})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(delta, sort_keys=False))
    return Recipe(path, run)
