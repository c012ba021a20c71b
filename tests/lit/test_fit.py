"""The tiny preset trains end-to-end through the real CLI (``glip-pl fit``) on synthetic shards, validates with box
AP, saves checkpoints with the resolved config and the data position, resumes, and refuses bad input early."""

from pathlib import Path

import pytest
import torch
from helpers.cli import glip_pl
from helpers.recipe import checkpoint, tiny_recipe, wandb_logger


def recipe(tmp: Path, shards: str, steps: int = 6, workers: int = 1, train: list | None = None):
    run = tmp / "run"
    return tiny_recipe(
        tmp, shards, steps=steps,
        trainer={"val_check_interval": steps, "check_val_every_n_epoch": None, "limit_val_batches": 2,
                 "logger": wandb_logger(run),
                 "callbacks": [checkpoint(run, every=3, cls="lightning.pytorch.callbacks.ModelCheckpoint")]},
        data={"val": [{"urls": f"{shards}/detection", "split": "val"}], "num_workers": workers,
              "train_min_sizes": [128], "train_max_size": 160, "val_size": 128, "val_max_size": 160,
              **({"train": train} if train else {})})


def test_fit_validate_checkpoint_and_resume(tmp_path, synthetic_shards):
    cfg = recipe(tmp_path, synthetic_shards)
    r = glip_pl("fit", *cfg.args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "val box AP" in r.stdout, r.stdout[-2000:]
    ckdir = tmp_path / "run" / "checkpoints"
    assert (ckdir / "last.ckpt").exists() and (tmp_path / "run" / "config.yaml").exists()
    ck = torch.load(ckdir / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 6
    assert "preset: tiny" in ck["glip_pl_config"]
    assert ck["GroundingDataModule"]["train_loader"]["batches"] > 0
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "offline W&B run written"
    run_id = (tmp_path / "run" / "wandb_run_id").read_text()

    # a restarted job resumes from last.ckpt on its own and continues the same W&B run
    r2 = glip_pl("fit", *cfg.args, "--trainer.max_steps", "9")
    assert r2.returncode == 0, r2.stderr[-4000:]
    assert "resuming from" in r2.stderr
    ck2 = torch.load(ckdir / "last.ckpt", weights_only=True)
    assert ck2["global_step"] == 9
    assert (tmp_path / "run" / "wandb_run_id").read_text() == run_id

    # validating a checkpoint names the checkpoint's step (the validate loop itself starts at step 0)
    r3 = glip_pl("validate", *cfg.args, "--ckpt_path", str(ckdir / "last.ckpt"))
    assert r3.returncode == 0, r3.stderr[-4000:]
    assert "[glip_pl] checkpoint step 9: val box AP" in r3.stdout, r3.stdout[-2000:]

    # the Lightning checkpoint serves the predictor / teacher path too
    from glip_pl.checkpoints import load_glip_checkpoint

    model = load_glip_checkpoint(ckdir / "last.ckpt")
    assert model.cfg.num_blocks == 2


def test_missing_shards_fail_before_training(tmp_path, synthetic_shards):
    cfg = recipe(tmp_path, synthetic_shards,
                 train=[{"urls": f"{synthetic_shards}/detection"}, {"urls": f"{tmp_path}/nowhere"}])
    r = glip_pl("fit", *cfg.args)
    assert r.returncode != 0
    assert "data.train[1]" in r.stderr and "nowhere" in r.stderr


def test_too_few_shards_for_workers_is_a_clear_error(tmp_path, synthetic_shards):
    cfg = recipe(tmp_path, synthetic_shards, workers=8)
    r = glip_pl("fit", *cfg.args)
    assert r.returncode != 0
    assert "has 6 shard(s)" in r.stderr and "num_workers 8 = 8 readers" in r.stderr


def test_checkpoint_of_another_preset_is_refused(tmp_path, synthetic_shards):
    from glip_pl.lit.module import GLIPLitModule
    from glip_pl.model.types import GLIPInputError

    other = tmp_path / "other.ckpt"
    small = GLIPLitModule(preset="tiny", model_options={"num_blocks": 1})
    torch.save({"state_dict": {f"model.{k}": v for k, v in small.model.state_dict().items()},
                "hyper_parameters": {"preset": "tiny", "model_options": {"num_blocks": 1}}}, other)
    with pytest.raises(GLIPInputError, match="do not fit"):
        GLIPLitModule(preset="tiny", init_weights=str(other))
