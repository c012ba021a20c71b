"""One run directory, ``trainer.default_root_dir``, that every output of a run derives from.

Where the config leaves them unset, each ``ModelCheckpoint`` writes to ``<run>/checkpoints`` and each logger to
``<run>`` (the W&B files, ``wandb_run_id``, and ``config.yaml``, which Lightning puts in the first logger's
``save_dir``); a W&B run is named after the directory. Explicit values are kept.
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
    """Fill in the run paths of one subcommand's parsed config; returns the run directory."""
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
