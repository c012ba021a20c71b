"""Shared helpers of the reliability tests: a small CPU recipe and a CLI runner (not a test module)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path


def small_recipe(tmp: Path, shards: str, steps: int = 10, workers: int = 0, extra_data: str = "",
                 every: int = 3, name: str = "run", model_extra: str = "", train_sources: str = "") -> Path:
    run = tmp / name
    train = train_sources or f"    - urls: {shards}/detection\n    - urls: {shards}/grounding\n"
    text = textwrap.dedent(f"""\
        seed_everything: 7
        trainer:
          accelerator: cpu
          devices: 1
          max_steps: {steps}
          log_every_n_steps: 1
          limit_val_batches: 0
          num_sanity_val_steps: 0
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {run}
          logger:
            class_path: lightning.pytorch.loggers.CSVLogger
            init_args:
              save_dir: {run}
          callbacks:
            - class_path: glip_pl.lit.checkpointing.AtomicModelCheckpoint
              init_args:
                dirpath: {run}/checkpoints
                every_n_train_steps: {every}
                save_last: true
                save_top_k: -1
                keep_last: 2
            - class_path: glip_pl.lit.checkpointing.PreemptionCheckpoint
        model:
          preset: tiny
          lr: 0.001
          lang_lr: 0.001
          warmup_steps: 2
        """) + textwrap.indent(model_extra, "  ") + "data:\n  train:\n" + train + textwrap.indent(textwrap.dedent(f"""\
        batch_size: 2
        num_workers: {workers}
        train_min_sizes: [64, 96]
        train_max_size: 128
        num_negatives: 4
        """), "  ") + textwrap.indent(extra_data, "  ")
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def cli_env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
            **extra}


def glip_pl(*args, timeout=600, **env):
    return subprocess.run([sys.executable, "-m", "glip_pl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(**env))


def popen(*args, **env):
    return subprocess.Popen([sys.executable, "-m", "glip_pl.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(**env))
