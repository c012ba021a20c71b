"""Exact resume with two processes as two simulated nodes (gloo DDP on CPU): SIGUSR1 reaches node 0 only, both
ranks agree to stop after the same step with one checkpoint, the pair resumes, and each rank's sample sequence
and the final weights equal an uninterrupted pair's (bitwise)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _recipes import cli_env, small_recipe  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 6


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair(cfg: Path, ids: Path) -> list:
    port, procs = _port(), []
    for node in (0, 1):
        env = cli_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node), WORLD_SIZE="2",
                      GLIP_PL_RECORD_IDS=str(ids))
        for var in ("RANK", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS"):
            env.pop(var, None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "glip_pl.cli", "fit", "--config", str(cfg), "--trainer.num_nodes", "2",
             "--trainer.devices", "1", "--trainer.strategy", "ddp"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return procs


def _wait(procs, timeout=300):
    out = []
    try:
        for p in procs:
            out.append((p.communicate(timeout=timeout)[1], p.returncode))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _recs(ids: Path, rank: int) -> list:
    p = ids if rank == 0 else Path(f"{ids}.rank{rank}")
    by_step = {}
    for r in (json.loads(x) for x in p.read_text().splitlines()):
        assert by_step.setdefault(r["step"], r) == r
    return [by_step[i] for i in sorted(by_step)]


def test_two_node_preemption_resume_is_exact(tmp_path, synthetic_shards):
    ref_cfg = small_recipe(tmp_path, synthetic_shards, STEPS, name="ref")
    pre_cfg = small_recipe(tmp_path, synthetic_shards, STEPS, name="pre")
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
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
