"""Exact resume with two processes as two simulated nodes (gloo DDP on CPU): SIGUSR1 reaches node 0 only, both
ranks agree to stop after the same step with one checkpoint, the pair resumes, and each rank's sample sequence,
the final weights, the AdamW state and the lr schedule equal an uninterrupted pair's (bitwise)."""

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers.cli import launch_nodes, wait_all
from helpers.compare import assert_same_tensors
from helpers.recipe import tiny_recipe

pytestmark = pytest.mark.slow
STEPS = 6


def _pair(cfg, ids: Path) -> list:
    return launch_nodes("fit", *cfg.args, "--trainer.num_nodes", "2", "--trainer.devices", "1",
                        "--trainer.strategy", "ddp", GLIP_PL_RECORD_IDS=str(ids))


def _wait(procs, timeout=300):
    return [(err, rc) for rc, _, err in wait_all(procs, timeout)]


def _recs(ids: Path, rank: int) -> list:
    p = ids if rank == 0 else Path(f"{ids}.rank{rank}")
    by_step = {}
    for r in (json.loads(x) for x in p.read_text().splitlines()):
        assert by_step.setdefault(r["step"], r) == r
    return [by_step[i] for i in sorted(by_step)]


def test_two_node_preemption_resume_is_exact(tmp_path, synthetic_shards):
    ref_cfg = tiny_recipe(tmp_path, synthetic_shards, "ref", steps=STEPS)
    pre_cfg = tiny_recipe(tmp_path, synthetic_shards, "pre", steps=STEPS)
    ref_ids, pre_ids = tmp_path / "ref.ids", tmp_path / "pre.ids"
    ref, pre = _pair(ref_cfg, ref_ids), _pair(pre_cfg, pre_ids)
    deadline, sent = time.time() + 300, False
    while time.time() < deadline and pre[0].poll() is None and not sent:
        if pre_ids.exists() and len(pre_ids.read_text().splitlines()) >= STEPS // 2:
            pre[0].send_signal(signal.SIGUSR1)  # node 0 only
            sent = True
        time.sleep(0.05)
    for err, rc in _wait(ref) + _wait(pre):
        assert rc == 0, err[-3000:]
    assert sent
    ck = torch.load(tmp_path / "pre" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["global_step"] < STEPS
    assert len(ck["GroundingDataModule"]["train_loader_by_rank"]) == 2
    stopped = ck["global_step"]
    for err, rc in _wait(_pair(pre_cfg, pre_ids)):
        assert rc == 0 and "resuming from" in err, err[-3000:]
    assert not (tmp_path / "pre" / "checkpoints" / "last-v1.ckpt").exists()
    for rank in (0, 1):
        assert _recs(pre_ids, rank) == _recs(ref_ids, rank), f"rank {rank}: a different sample sequence"
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "pre" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    assert_same_tensors(a["state_dict"], b["state_dict"], "state_dict")
    # AdamW exp_avg / exp_avg_sq / step of every parameter, the param groups' lr, and the scheduler's state
    assert_same_tensors(a["optimizer_states"], b["optimizer_states"], "optimizer")
    assert a["lr_schedulers"] == b["lr_schedulers"]
