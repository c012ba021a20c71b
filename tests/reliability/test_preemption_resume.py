"""Exact resume after preemption: the tiny CPU recipe trained 10 steps in one go, and again with SIGTERM (or
SIGUSR1, Slurm's preemption warning) after 5 steps followed by an automatic resume, ends with bit-identical
weights and optimiser state and has seen the same samples in the same order.

Bitwise on CPU: same seed, world size, batch size and one torch thread; the data position, the RNG states and
the optimiser/scheduler states travel with the checkpoint. The SIGTERM run reads with 0 data workers, the
SIGUSR1 run with 1 worker (the same logical stream), both compared with one uninterrupted 0-worker run. The
SIGTERM run's last.ckpt is truncated before the resume: it falls back to the step-3 checkpoint, replays the steps
after it with the same samples, and still ends bit-identical.
The SIGUSR1 run has ``SLURM_JOB_ID`` set and a stand-in ``scontrol`` on PATH: the callback requeues the job.
"""

import json
import os
import signal
import time
from pathlib import Path

import torch
from helpers.cli import popen
from helpers.compare import assert_same_tensors
from helpers.recipe import tiny_recipe

STEPS = 8


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _records(path: Path) -> list:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_resume_after_sigterm_and_sigusr1_is_exact(tmp_path, synthetic_shards):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    (fake_bin / "scontrol").chmod(0o755)
    runs = {
        "ref": (tiny_recipe(tmp_path, synthetic_shards, "ref", steps=STEPS), None, {}),
        "term": (tiny_recipe(tmp_path, synthetic_shards, "term", steps=STEPS), signal.SIGTERM, {}),
        "usr1": (tiny_recipe(tmp_path, synthetic_shards, "usr1", steps=STEPS,
                              data={"num_workers": 1}), signal.SIGUSR1,
                 {"SLURM_JOB_ID": "4242", "PATH": f"{fake_bin}:{os.environ['PATH']}"}),
    }
    ids = {k: tmp_path / f"{k}.ids.jsonl" for k in runs}
    # all three at once (one torch thread each)
    procs = {k: popen("fit", *cfg.args, GLIP_PL_RECORD_IDS=str(ids[k]), **env)
             for k, (cfg, _, env) in runs.items()}
    sent = {}
    deadline = time.time() + 400
    while time.time() < deadline and any(p.poll() is None for p in procs.values()):
        for k, (_, sig, _) in runs.items():
            if sig is not None and k not in sent and _lines(ids[k]) >= STEPS // 2 and procs[k].poll() is None:
                procs[k].send_signal(sig)
                sent[k] = _lines(ids[k])
        time.sleep(0.05)
    outs = {k: p.communicate(timeout=60) for k, p in procs.items()}
    assert procs["ref"].returncode == 0, outs["ref"][1][-3000:]
    for k in ("term", "usr1"):
        err = outs[k][1]
        assert k in sent, f"{k}: finished before the signal could be sent"
        assert "preempted" in err, err[-3000:]
        stopped = _state(tmp_path / k)["global_step"]
        assert stopped < STEPS, f"{k}: the run did not stop early ({stopped})"
        print(f"{k}: signal after {sent[k]} recorded steps, stopped at step {stopped}, exit {procs[k].returncode}")
        assert _lines(ids[k]) == stopped, "every trained step is in the checkpoint, none after it"
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text()

    # the SIGTERM job's last.ckpt is then damaged (as if the kill had come mid-write on a filesystem without
    # atomic rename): the resume must pass over it, take the step-3 checkpoint and still end bit-identical
    last = tmp_path / "term" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:4096])

    # the requeued/restarted jobs: the same command, auto-resume from the newest valid checkpoint
    procs = {k: popen("fit", *runs[k][0].args, GLIP_PL_RECORD_IDS=str(ids[k])) for k in ("term", "usr1")}
    outs = {k: p.communicate(timeout=400) for k, p in procs.items()}
    ref_ids, ref = _records(ids["ref"]), _state(tmp_path / "ref")
    assert [r["step"] for r in ref_ids] == list(range(STEPS))
    for k, p in procs.items():
        assert p.returncode == 0, outs[k][1][-3000:]
        assert "resuming from" in outs[k][1]
        if k == "term":
            assert "skipping invalid checkpoint" in outs[k][1] and "step=3.ckpt" in outs[k][1], outs[k][1][-2000:]
        else:
            assert len(_records(ids[k])) == STEPS, "nothing repeated after a clean preemption"
        recs = _records(ids[k])
        by_step = {}
        for r in recs:  # a replayed step (after the fallback) must see exactly the same samples again
            assert by_step.setdefault(r["step"], r) == r, f"{k}: step {r['step']} replayed differently"
        assert [by_step[i] for i in sorted(by_step)] == ref_ids, f"{k}: a different sample sequence"
        st = _state(tmp_path / k)
        assert st["global_step"] == STEPS
        assert_same_tensors(ref["state_dict"], st["state_dict"], f"{k}.state_dict")
        assert_same_tensors(ref["optimizer_states"], st["optimizer_states"], f"{k}.optimizer")
        assert ref["lr_schedulers"] == st["lr_schedulers"]
