"""``glip-pl fit | validate | test`` through LightningCLI; several ``--config`` files stack (cluster + recipe).

The run directory, auto-resume, preemption, the run lock and the recipe allow-list are described in README.md
"Training" and docs/reliability.md; ``--ckpt_path none`` forces a fresh start. ``--weights_only`` defaults to true
for every subcommand: Lightning 2.6.6 passes ``None`` (torch's default) otherwise.
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Optional

import lightning.pytorch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.callbacks import ModelCheckpoint

from glip_pl.lit.allowlist import (  # noqa: F401  (re-exported: the allow-list's public names)
    ALLOWED_CLASS_PREFIXES, RecipeRefused, check_class_paths, class_path_allowed, denied_import_error, import_policy,
    refuse_callables,
)
from glip_pl.lit.console import quiet_library_notices, resuming, use_console_callbacks
from glip_pl.lit.datamodule import GroundingDataModule
from glip_pl.lit.logging import launch_rank
from glip_pl.lit.module import GLIPLitModule
from glip_pl.lit.recipes import RecipeArgumentParser, RecipeConfigFile
from glip_pl.lit.run_dir import derive_run_paths


class _SaveConfig(SaveConfigCallback):
    """Also pushes config.yaml to every logger (W&B, CSV) and into every checkpoint."""

    def save_config(self, trainer, pl_module, stage) -> None:
        cfg = self.parser.dump(self.config, skip_none=False)
        if trainer.is_global_zero:
            import yaml

            for logger in trainer.loggers:
                logger.log_hyperparams({"config": yaml.safe_load(cfg)})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["glip_pl_config"] = self.parser.dump(self.config, skip_none=False)


class GLIPCLI(LightningCLI):
    """LightningCLI with the project's checks and defaults. ``data`` takes ``GroundingDataModule``'s arguments
    directly, or ``class_path: glip_pl.label.datamodule.TeacherStudentDataModule`` (gold + pseudo-labelled sources)
    with its ``init_args``: any ``GroundingDataModule`` subclass from the allow-list."""

    def __init__(self, model_class=GLIPLitModule, datamodule_class=GroundingDataModule, *args,
                 subclass_mode_data: bool = True, parser_class=RecipeArgumentParser, **kwargs):
        self._run_lock = None
        quiet_library_notices()
        try:
            super().__init__(model_class, datamodule_class, *args, subclass_mode_data=subclass_mode_data,
                             parser_class=parser_class, **kwargs)
        finally:  # LightningCLI runs the subcommand inside __init__
            if self._run_lock is not None:
                self._run_lock.release()

    def init_parser(self, **kwargs):
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={lightning.pytorch.__version__}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument("-c", "--config", action=RecipeConfigFile,
                            help="a recipe (YAML); repeat to stack (cluster, then recipe); a recipe's __base__ "
                                 "files are applied before it (glip_pl.lit.recipes)")
        return parser

    def parse_arguments(self, parser, args) -> None:
        argv = sys.argv[1:] if args is None else args
        check_class_paths(argv)
        # errors come back here, not exit inside jsonargparse, so a denied import is reported as its recipe key
        parsers = [parser, *getattr(parser._subcommands_action, "_name_parser_map", {}).values()]
        exits = [p.exit_on_error for p in parsers]
        for p in parsers:
            p.exit_on_error = False
        try:
            with import_policy():
                # not super(): glip-pl passes its own argv as ``args`` (``predict-batch`` renamed ``predict``), which
                # Lightning warns about whenever sys.argv is not empty
                self.config = parser.parse_args(argv)
        except ArgumentError as e:
            refused = denied_import_error(str(e), argv)
            if refused is not None:
                raise refused from None
            for p, ex in zip(parsers, exits):
                p.exit_on_error = ex
            parser.error(str(e), e)  # jsonargparse's usual report (usage + message, exit 2)
        finally:
            for p, ex in zip(parsers, exits):
                p.exit_on_error = ex
        refuse_callables(self.config, argv, self.config.get("subcommand"))

    def instantiate_classes(self) -> None:
        with import_policy():
            super().instantiate_classes()

    def add_arguments_to_parser(self, parser) -> None:
        if self.subclass_mode_data:  # plain ``data:`` keys configure the default data module
            cls = self.datamodule_class
            parser.set_defaults({"data": {"class_path": f"{cls.__module__}.{cls.__qualname__}"}})
        parser.add_argument("--auto_resume", type=bool, default=True,
                            help="resume fit from <default_root_dir>/checkpoints/last.ckpt when it exists")
        parser.add_argument("--preemption_checkpoint", type=bool, default=True,
                            help="fit: add glip_pl.lit.checkpointing.PreemptionCheckpoint when the recipe has none "
                                 "(SIGTERM/SIGUSR1 -> checkpoint at the step boundary, stop, requeue under Slurm)")
        parser.add_argument("--cpu_threads", type=int, default=1,
                            help="torch intra-op threads when training on CPU (the tiny preset is dominated by "
                                 "per-op overhead: 1 thread measured 7x faster than 2 on a busy 2-core machine); "
                                 "0 keeps torch's default")

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub] if sub else self.config
        root = derive_run_paths(cfg)
        if sub == "fit" and launch_rank() == 0:
            # before anything is built: the logger takes the run's W&B id, auto-resume may move files
            from glip_pl.run_lock import RunLock, RunLockHeld

            try:
                self._run_lock = RunLock(root, "glip-pl fit").acquire()
            except RunLockHeld as e:
                raise SystemExit(f"[glip_pl] fit: {e}") from None
        # the data module hands out its own per-rank shard streams: no DistributedSampler
        cfg.trainer.use_distributed_sampler = False
        if cfg.trainer.accelerator == "cpu" and cfg.get("cpu_threads", 1):
            import torch

            torch.set_num_threads(int(cfg.cpu_threads))

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "fit" and cfg.get("preemption_checkpoint", True):
            from glip_pl.lit.checkpointing import PreemptionCheckpoint

            if not any(isinstance(c, PreemptionCheckpoint) for c in trainer.callbacks):
                trainer.callbacks.append(PreemptionCheckpoint())
        if self.subcommand == "fit" and trainer.loggers:
            from lightning.pytorch.callbacks import LearningRateMonitor

            if not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks):
                trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
        if self.subcommand == "predict":
            from glip_pl.lit.prediction_writer import DetectionWriter

            if not any(isinstance(c, DetectionWriter) for c in trainer.callbacks):
                trainer.callbacks.append(DetectionWriter(str(Path(trainer.default_root_dir) / "predictions")))
        use_console_callbacks(trainer)
        return trainer

    def fit(self, **kwargs) -> None:
        if kwargs.get("ckpt_path"):
            resuming()
        self.trainer.fit(**kwargs)

    def predict(self, **kwargs) -> None:
        if kwargs.get("return_predictions") is None:  # DetectionWriter has written them: do not hold them all
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Lightning reads ``--ckpt_path``'s hyper-parameters here, first of all: a bad file is one line (no torch
        traceback), and the hyper-parameters, parsed like a recipe, are held to the same import policy."""
        sub = self.config.get("subcommand")
        ck = self.config[sub].get("ckpt_path") if sub else None
        if isinstance(ck, str) and ck.lower() != "none" and ck.split(":")[0] not in LIGHTNING_CKPT_KEYWORDS:
            from glip_pl.checkpoints import checkpoint_problem

            why = checkpoint_problem(ck)
            if why is not None:
                raise SystemExit(f"[glip_pl] {sub} --ckpt_path {ck}: {why}")
        with import_policy():
            super()._parse_ckpt_path()

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        cfg = self.config[subcommand]
        ck = kwargs.get("ckpt_path")
        if isinstance(ck, str) and ck.lower() == "none":
            kwargs["ckpt_path"] = None
        elif subcommand == "fit" and ck is None and cfg.get("auto_resume", True):
            last = prefer_hpc_checkpoint(self.trainer.default_root_dir, self._newest_valid_checkpoint())
            if last:
                print(f"[glip_pl] resuming from {last}", file=sys.stderr)
                kwargs["ckpt_path"] = str(last)
        if "weights_only" in kwargs and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = True
        return kwargs

    def _newest_valid_checkpoint(self):
        """The newest loadable checkpoint of this run; newer bad ones are reported and (rank 0) moved aside."""
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        from glip_pl.lit.checkpointing import find_resume_checkpoint

        dirs = [c.dirpath for c in self.trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        dirs.append(str(Path(self.trainer.default_root_dir) / "checkpoints"))
        for d in dict.fromkeys(dirs):
            found = find_resume_checkpoint(d, move_bad=getattr(rank_zero_only, "rank", 0) == 0)
            if found:
                return found
        return None


# ckpt_path values that Lightning resolves itself (validate/test/predict: from the trainer's checkpoint callbacks)
LIGHTNING_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")


def prefer_hpc_checkpoint(root, chosen: Optional[str]) -> Optional[str]:
    """``chosen`` unless ``<root>/hpc_ckpt_<n>.ckpt`` is newer: Lightning restores that Slurm preemption file by
    itself only when ``ckpt_path`` is None, and auto-resume passes a path."""
    hpc = [p for p in Path(root).glob("hpc_ckpt_*.ckpt") if p.is_file() and p.stem.rsplit("_", 1)[-1].isdigit()]
    if not hpc:
        return chosen
    newest = max(hpc, key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if chosen is None or newest.stat().st_mtime >= Path(chosen).stat().st_mtime:
        return str(newest)
    return chosen


def run(args: list) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    GLIPCLI(
        GLIPLitModule,
        GroundingDataModule,
        save_config_callback=_SaveConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        seed_everything_default=1234,
        parser_kwargs={"parser_mode": "yaml"},
        auto_configure_optimizers=False,
    )
    return 0
