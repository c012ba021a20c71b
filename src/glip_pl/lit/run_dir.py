"""One run directory that every output of a run derives from: ``trainer.default_root_dir``.

``glip-pl fit|validate|test`` fill in, where the recipe leaves them unset, the checkpoint folder of every
``ModelCheckpoint`` (``<run>/checkpoints``) and the ``save_dir`` of every logger that has one (``<run>``: the W&B
files, ``wandb_run_id`` and ``config.yaml``, which Lightning writes to the first logger's ``save_dir``) and a W&B
run's ``name`` (the run directory's name). The run lock ``<run>/glip_pl.lock`` and Slurm's ``hpc_ckpt_*.ckpt`` sit
in the run directory too. So ``--trainer.default_root_dir X`` moves the whole run; a value a recipe or flag sets
explicitly is kept.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

DEFAULT_RUN_DIR = "runs/default"  # when neither the recipe nor a flag names one (Lightning's default is the cwd)


def _class(class_path: Optional[str]):
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _is(spec, base) -> bool:
    cls = _class(getattr(spec, "class_path", None))
    return isinstance(cls, type) and issubclass(cls, base)


def derive_run_paths(cfg) -> str:
    """Set ``cfg.trainer.default_root_dir`` (``DEFAULT_RUN_DIR`` when unset) and the run paths derived from it, in
    the parsed config of one subcommand (a jsonargparse Namespace); returns the run directory."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import WandbLogger

    trainer = cfg.trainer
    root = str(trainer.default_root_dir or DEFAULT_RUN_DIR)
    trainer.default_root_dir = root
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for spec in loggers:
        args = getattr(spec, "init_args", None)
        if args is None:
            continue
        if "save_dir" in args and args.save_dir is None:
            args.save_dir = root
        if _is(spec, WandbLogger) and "name" in args and args.name is None:
            args.name = Path(root).name or None
    for spec in trainer.callbacks or []:
        args = getattr(spec, "init_args", None)
        if args is not None and "dirpath" in args and args.dirpath is None and _is(spec, ModelCheckpoint):
            args.dirpath = str(Path(root) / "checkpoints")
    return root
