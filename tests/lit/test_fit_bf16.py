"""``precision: bf16-mixed`` (the cluster recipes' setting) through ``glip-pl fit`` on CPU with the tiny recipe:
it trains with finite losses, saves a checkpoint, and a restart resumes from it (the global step continues).

Lightning runs bf16-mixed on CPU as ``torch.autocast("cpu", torch.bfloat16)`` with fp32 weights; the checkpoint
holds fp32 weights and the optimiser state.

Images are 96–128 px, not 64: with torch 2.14.1 on CPU, oneDNN's bf16 conv weight gradient is garbage (inf/NaN or
~1e20) for a 1×1 input at stride 2 (measured; fp32 and the non-oneDNN path are right), which is the FPN's P7 conv
whenever P6 is 1×1, i.e. an image side ≤ 64 px. Every step of a 64 px bf16-mixed run then has non-finite
gradients and the run stops after ``max_bad_steps`` (BENCHMARKS.md, "Precision")."""

import csv
import math
from pathlib import Path

import torch
import yaml
from helpers.cli import glip_pl
from helpers.recipe import tiny_recipe

FIRST, TOTAL = 3, 5


def _bf16_recipe(tmp: Path, shards: str, steps: int):
    return tiny_recipe(tmp, shards, "bf16", steps=steps, every=FIRST, trainer={"precision": "bf16-mixed"},
                       data={"train_min_sizes": [96], "train_max_size": 128})  # see the module docstring


def _train_losses(run: Path) -> dict:
    """{step: total train loss} over every CSVLogger version of the run (one per start); a step logged by two
    starts fails here."""
    out = {}
    for f in run.glob("lightning_logs/version_*/metrics.csv"):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                step = int(row["step"])
                assert step not in out, f"step {step} logged twice"
                out[step] = float(row["train/loss"])
    return out


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_bf16_mixed_fit_checkpoints_and_resumes(tmp_path, synthetic_shards):
    run = tmp_path / "bf16"
    r = glip_pl("fit", *_bf16_recipe(tmp_path, synthetic_shards, FIRST).args, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    # the run's composed config is what the trainer was built with (Lightning prints no AMP line on CPU)
    (config,) = run.glob("lightning_logs/version_0/config.yaml")
    assert yaml.safe_load(config.read_text())["trainer"]["precision"] == "bf16-mixed"
    first = _ckpt(run)
    assert first["global_step"] == FIRST
    weights = first["state_dict"]
    assert weights and all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())

    r = glip_pl("fit", *_bf16_recipe(tmp_path, synthetic_shards, TOTAL).args, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    second = _ckpt(run)
    assert second["global_step"] == TOTAL
    losses = _train_losses(run)
    assert sorted(losses) == list(range(TOTAL)), losses  # every step logged once: the restart did not start over
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert "train/bad_steps" not in "".join(f.read_text() for f in run.glob("lightning_logs/version_*/metrics.csv"))
    assert any(not torch.equal(weights[k], second["state_dict"][k]) for k in weights)  # the resumed steps trained
