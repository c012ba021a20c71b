"""``glip-pl predict-batch``: LightningCLI's predict runs end to end on a tiny checkpoint and writes detections."""

import json
import os
import subprocess
import sys

import yaml


def _glip_pl(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    r = subprocess.run([sys.executable, "-m", "glip_pl.cli", *args], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_predict_batch_writes_one_record_per_val_image(tmp_path, synthetic_shards):
    run = tmp_path / "run"
    cfg = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
                    "default_root_dir": str(run),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True,
                                                 "save_top_k": 0}}]},
        # every box kept: a 2-step model scores below the default 0.05
        "model": {"preset": "tiny", "warmup_steps": 1, "eval_score_thresh": 0.0},
        "data": {"train": [{"urls": f"{synthetic_shards}/detection"}],
                 "val": [{"urls": f"{synthetic_shards}/detection", "split": "val"}],
                 "batch_size": 4, "num_workers": 1, "train_min_sizes": [96], "train_max_size": 96, "val_size": 96,
                 "val_max_size": 96, "num_negatives": 2},
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _glip_pl("fit", "--config", str(recipe))
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    r = _glip_pl("predict-batch", "--config", str(recipe), "--ckpt_path", str(ckpt))
    out = run / "predictions" / "predictions-rank0.jsonl"
    assert f"32 images -> {out}" in r.stdout, r.stdout[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 32 and len({r["id"] for r in records}) == 32
    assert all(r["source"] == "synthetic-detection" and (r["height"], r["width"]) == (256, 256) for r in records)
    boxes = [b for r in records for b in r["boxes"]]
    assert boxes and all(0 <= x1 <= x2 <= 256 and 0 <= y1 <= y2 <= 256 for x1, y1, x2, y2 in boxes)
    for r in records:
        assert len(r["boxes"]) == len(r["scores"]) == len(r["labels"]) == len(r["phrases"])
    # labels are the synthetic set's category ids (1..12), named by their phrase in the all-class prompt
    names = {}
    for r in records:
        for label, phrase in zip(r["labels"], r["phrases"]):
            names.setdefault(label, set()).add(phrase)
    assert set(names) <= set(range(1, 13)) and all(len(p) == 1 for p in names.values()), names
