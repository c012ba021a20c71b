"""What a run logs: one throughput figure, MFU where the device's peak is known, one lr series per parameter group,
COCO AP / AR after validation, and the whole composed config in the W&B run (read back from the offline run file)."""

import csv
import glob
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def wandb_offline_records(run_dir: Path):
    """History rows and config items of the offline W&B run under ``run_dir`` (the .wandb file is a LevelDB-style
    log of protobuf records: 32 KiB blocks, 7-byte record headers, records split FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(f"{run_dir}/wandb/offline-run-*/*.wandb")
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, raw = 7, 32768, b"", []
    while pos < len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            raw.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            raw.append(buf + chunk)
    history, config = [], {}
    for r in raw:
        rec = pb.Record()
        rec.ParseFromString(r)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item})
        elif kind == "config":
            config.update({it.key: json.loads(it.value_json) for it in rec.config.update})
    return history, config


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory, synthetic_shards):
    """3 steps of the tiny preset through ``glip-pl fit`` (W&B offline + CSV), validation at the end."""
    tmp = tmp_path_factory.mktemp("dashboard")
    run = tmp / "run"
    cfg = tmp / "recipe.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        trainer:
          accelerator: cpu
          max_steps: 3
          log_every_n_steps: 1
          val_check_interval: 3
          check_val_every_n_epoch: null
          limit_val_batches: 2
          num_sanity_val_steps: 0
          enable_progress_bar: false
          enable_model_summary: false
          enable_checkpointing: false
          default_root_dir: {run}
          logger:
            - class_path: glip_pl.lit.logging.GLIPWandbLogger
              init_args:
                save_dir: {run}
            - class_path: lightning.pytorch.loggers.CSVLogger
              init_args:
                save_dir: {run}
                name: csv
          callbacks:
            - class_path: glip_pl.lit.callbacks.ThroughputMonitor
              init_args:
                log_every_n_steps: 1
        model:
          preset: tiny
          warmup_steps: 2
        data:
          train:
            - urls: {synthetic_shards}/detection
          val:
            - urls: {synthetic_shards}/detection
              split: val
          batch_size: 2
          num_workers: 0
          train_min_sizes: [128]
          train_max_size: 160
          val_size: 128
          val_max_size: 160
        """))
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    r = subprocess.run([sys.executable, "-m", "glip_pl.cli", "fit", "--config", str(cfg)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (metrics_csv,) = run.glob("csv/version_*/metrics.csv")
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    return run, rows, r.stdout + r.stderr


def _logged(rows) -> set:
    return {k for r in rows for k, v in r.items() if v not in ("", None)}


def test_one_throughput_figure_and_no_mfu_on_cpu(fit_run):
    _, rows, out = fit_run
    keys = _logged(rows)
    rates = sorted(k for k in keys if re.search(r"per_s(ec)?$", k))
    assert rates == ["perf/images_per_s"], rates
    assert not [k for k in keys if "mfu" in k or "flops" in k], keys
    lines = [ln for ln in out.splitlines() if "perf/mfu is not logged" in ln]
    assert len(lines) == 1 and "peak FLOP/s of cpu is unknown" in lines[0], out[-2000:]
    gflop = float(re.search(r"ThroughputMonitor: ([0-9.e+]+) GFLOP per batch of 2", lines[0]).group(1))
    assert gflop > 0
    perf = [r for r in rows if r.get("perf/images_per_s")]
    assert perf and all(0 <= float(r["perf/data_wait_fraction"]) <= 1 for r in perf)
    for r in perf:  # the data-wait split covers the same step (window 1) as the images/s: 2 images per step
        step_s = float(r["perf/data_wait_s"]) + float(r["perf/compute_s"])
        assert float(r["perf/images_per_s"]) == pytest.approx(2 / step_s, rel=0.02)


def test_one_lr_series_per_param_group(fit_run):
    from glip_pl.lit import optim
    from glip_pl.model import build_glip

    _, rows, _ = fit_run
    groups = [g["name"] for g in optim.param_groups(build_glip("tiny"), 1e-4, 1e-5, 1e-4, False, 2.0)]
    assert len(groups) >= 2
    lr_keys = sorted(k for k in _logged(rows) if k.startswith("lr"))
    assert lr_keys == sorted(f"lr-AdamW/{g}" for g in groups), lr_keys


def test_validation_logs_ap_by_size_and_ar(fit_run):
    _, rows, _ = fit_run
    keys = _logged(rows)
    assert {"val/AP", "val/AP50", "val/AP75", "val/APs", "val/APm", "val/APl", "val/AR100"} <= keys, keys


def test_the_whole_config_reaches_wandb(fit_run):
    run, _, _ = fit_run
    history, config = wandb_offline_records(run)
    assert {"trainer", "model", "data"} <= set(config["config"]), sorted(config["config"])
    tr = config["config"]["trainer"]
    assert tr["max_steps"] == 3
    assert any("ThroughputMonitor" in c["class_path"] for c in tr["callbacks"])
    assert config["config"]["data"]["init_args"]["batch_size"] == 2
    logged = {k for h in history for k in h}
    assert "perf/images_per_s" in logged and "lr-AdamW/language" in logged
    import yaml

    (hparams,) = run.glob("csv/version_*/hparams.yaml")  # every logger gets the config, not only the first
    assert {"trainer", "model", "data"} <= set(yaml.safe_load(hparams.read_text())["config"])


def test_mfu_where_the_peak_is_known(tmp_path, synthetic_shards, monkeypatch):
    """With a (pretended) peak, MFU = counted FLOPs per batch × batches/s ÷ peak."""
    import lightning as L
    from lightning.pytorch.callbacks import throughput_monitor
    from lightning.pytorch.loggers import CSVLogger

    from glip_pl.lit.callbacks import ThroughputMonitor
    from glip_pl.lit.datamodule import GroundingDataModule
    from glip_pl.lit.module import GLIPLitModule

    peak = 1e12
    monkeypatch.setattr(throughput_monitor, "get_available_flops", lambda device, dtype: peak)
    dm = GroundingDataModule(train=[{"urls": f"{synthetic_shards}/detection"}], batch_size=2, num_workers=0,
                             train_min_sizes=[128], train_max_size=128)
    cb = ThroughputMonitor(log_every_n_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, log_every_n_steps=1, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        logger=CSVLogger(tmp_path, name="csv"), callbacks=[cb])
    trainer.fit(GLIPLitModule(preset="tiny", warmup_steps=2), datamodule=dm)
    assert cb.flops_per_batch and cb.flops_per_batch > 0
    (metrics_csv,) = tmp_path.glob("csv/version_*/metrics.csv")
    with open(metrics_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/mfu")]
    assert rows
    for r in rows:
        batches_per_s = float(r["perf/images_per_s"]) / 2
        assert float(r["perf/mfu"]) == pytest.approx(cb.flops_per_batch * batches_per_s / peak, rel=1e-6)


def test_flop_count_equals_a_real_step_and_leaves_the_model_alone(synthetic_shards, tokenizer):
    from torch.utils.flop_counter import FlopCounterMode

    from glip_pl.data import SourceSpec, TransformConfig, build_loader
    from glip_pl.lit.flops import train_step_flops
    from glip_pl.model import build_glip

    loader = build_loader([SourceSpec(urls=f"{synthetic_shards}/detection")], tokenizer, 2, train=True,
                          transforms=TransformConfig.eval(128, 128))
    batch = next(iter(loader))
    args = (batch.images, batch.image_sizes, batch.text, batch.targets)
    torch.manual_seed(0)
    model = build_glip("tiny", use_sdpa=False).train()  # plain attention: what the counter sees
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    counted = train_step_flops(model, *args)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with FlopCounterMode(display=False) as real:
        model.criterion.total(model.loss(model(*args[:3]), args[3])).backward()
    assert counted == real.get_total_flops() > 0
    # model FLOPs: the same count whatever the kernels and whatever is recomputed in the backward
    switches = dict(use_sdpa=True, deform_conv="torchvision", checkpoint_backbone=True, checkpoint_text=True,
                    checkpoint_fusion=True, checkpoint_dyhead=True)
    assert train_step_flops(build_glip("tiny", **switches).train(), *args) == counted


def test_sharded_parameters_are_not_counted(synthetic_shards, tokenizer):
    """FSDP2 leaves each rank DTensor shards: no full shapes to copy, so no count (and no MFU), said in words."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from glip_pl.data import SourceSpec, TransformConfig, build_loader
    from glip_pl.lit.flops import FlopsNotCounted, train_step_flops
    from glip_pl.lit.strategies import shard_glip
    from glip_pl.model import build_glip

    batch = next(iter(build_loader([SourceSpec(urls=f"{synthetic_shards}/detection")], tokenizer, 2, train=True,
                                   transforms=TransformConfig.eval(128, 128))))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = build_glip("tiny")
        shard_glip(model, init_device_mesh("cpu", (1,)))
        with pytest.raises(FlopsNotCounted, match="DTensor shard"):
            train_step_flops(model, batch.images, batch.image_sizes, batch.text, batch.targets)
    finally:
        dist.destroy_process_group()
