"""A clean ``glip-pl fit`` and its resume print no library noise (issue 24 points 5 and 10)."""

import os
import subprocess
import sys

import yaml

# each was printed by a clean tiny fit or its resume before the console was cleaned up
NOISE = [
    "args parameter is intended to run from within Python",  # LightningCLI: args= and sys.argv both given
    "litlogger",  # Lightning's advertisement
    "anonymous setting has no effect",  # W&B, from Lightning's anonymous=None
    "LeafSpec",  # torch deprecation inside Lightning's _pytree
    "You have overridden `transfer_batch_to_device`",
    "exists and is not empty",  # ModelCheckpoint, on a legitimate resume
    "FLOPs",  # the summary's column of zeros
    "Total Flops",
    "/-2 ",  # "Epoch 0/-2": max_epochs - 1 of a step-limited run
]


def _glip_pl(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    r = subprocess.run([sys.executable, "-m", "glip_pl.cli", *args], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout + r.stderr


def _recipe(tmp_path, shards, steps):
    run = tmp_path / "run"
    cfg = {
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": steps, "val_check_interval": 2,
            "check_val_every_n_epoch": None, "limit_val_batches": 2, "num_sanity_val_steps": 1,
            "log_every_n_steps": 1, "enable_progress_bar": True, "default_root_dir": str(run),
            "logger": {"class_path": "glip_pl.lit.logging.GLIPWandbLogger", "init_args": {"save_dir": str(run)}},
            "callbacks": [{"class_path": "glip_pl.lit.checkpointing.AtomicModelCheckpoint",
                           "init_args": {"dirpath": str(run / "checkpoints"), "every_n_train_steps": 1,
                                         "save_last": True, "save_top_k": -1}}],
        },
        "model": {"preset": "tiny", "warmup_steps": 1},
        "data": {"train": [{"urls": f"{shards}/detection"}], "val": [{"urls": f"{shards}/detection", "split": "val"}],
                 "batch_size": 2, "num_workers": 1, "train_min_sizes": [96], "train_max_size": 96, "val_size": 96,
                 "val_max_size": 96, "num_negatives": 2},
    }
    path = tmp_path / f"steps{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_fit_and_resume_print_no_library_noise(tmp_path, synthetic_shards):
    first = _glip_pl("fit", "--config", str(_recipe(tmp_path, synthetic_shards, 2)))
    resumed = _glip_pl("fit", "--config", str(_recipe(tmp_path, synthetic_shards, 3)))
    assert "resuming from" in resumed and "Restored all states" in resumed, resumed[-3000:]
    for text, out in (("fit", first), ("resume", resumed)):
        found = [n for n in NOISE if n in out]
        assert not found, (text, found, out[-4000:])
    # the bar counts optimiser steps out of max_steps, across the resume
    assert "Epoch 0, step" in first and "2/2" in first, first[-3000:]
    assert "3/3" in resumed, resumed[-3000:]
    # the step-0 sanity check ran 1 of the 2 val batches: it is said to be one, with no AP
    assert "sanity check passed: validation ran on 2 images (1 of 2 val batches)" in first, first[-3000:]
    assert "step 0: val box AP" not in first
    assert "step 2: val box AP" in first


def test_help_and_print_config_print_no_warning(tmp_path, synthetic_shards):
    cfg = _recipe(tmp_path, synthetic_shards, 2)
    for args in (["fit", "--help"], ["fit", "--config", str(cfg), "--print_config"]):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        r = subprocess.run([sys.executable, "-m", "glip_pl.cli", *args], capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0 and r.stdout, r.stderr[-3000:]
        assert r.stderr == "", (args, r.stderr[-3000:])
