"""One job per directory (issue 21): a second ``glip-pl fit`` on a run directory, or ``glip-pl pseudo-label`` on an
output folder, is refused naming the holder; a stale lock (dead pid on this host) and a Slurm requeue of the same
job are let through; the lock goes with its holder."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.cli import cli_env
from helpers.recipe import tiny_recipe

from glip_pl.run_lock import LOCK_NAME, RunLock, RunLockHeld


@pytest.fixture
def holder(tmp_path):
    """Start a process that takes the lock of a directory through the real API and sleeps; yields (proc, dir)."""
    procs = []

    def start(directory: Path, command="glip-pl fit", **env):
        code = textwrap.dedent(f"""
            import sys, time
            from glip_pl.run_lock import RunLock
            RunLock({str(directory)!r}, {command!r}).acquire()
            print("held", flush=True)
            time.sleep(120)
            """)
        full = cli_env(**env)
        if "SLURM_JOB_ID" not in env:
            full.pop("SLURM_JOB_ID", None)
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=full)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_second_fit_on_a_run_dir_is_refused_naming_the_holder(tmp_path, holder, monkeypatch):
    _no_slurm(monkeypatch)
    # the shards need not exist: the lock is taken before anything is built
    cfg = tiny_recipe(tmp_path, str(tmp_path / "no-shards"), steps=1)
    first = holder(tmp_path / "run")
    env = {k: v for k, v in cli_env().items() if k != "SLURM_JOB_ID"}
    r = subprocess.run([sys.executable, "-m", "glip_pl.cli", "fit", *cfg.args], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 1, r.stderr[-3000:]
    line = f"is in use by glip-pl fit on host {socket.gethostname()}, pid {first.pid}"
    assert line in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    # the refused run left the holder's lock alone
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == first.pid


def test_pseudo_label_output_folder_is_locked_too(tmp_path, holder, monkeypatch):
    _no_slurm(monkeypatch)
    out = tmp_path / "pseudo"
    first = holder(out, command="glip-pl pseudo-label")
    env = {k: v for k, v in cli_env().items() if k != "SLURM_JOB_ID"}
    r = subprocess.run([sys.executable, "-m", "glip_pl.cli", "pseudo-label", "--teacher", str(tmp_path / "t.ckpt"),
                        "--input", str(tmp_path / "captions"), "--output", str(out)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"pseudo-label: {out} is in use by glip-pl pseudo-label on host {socket.gethostname()}, pid {first.pid}" \
        in r.stderr, r.stderr[-3000:]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(d: Path, **rec) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "command": "glip-pl fit",
                                           "started": "earlier", "token": "x", **rec}))


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, monkeypatch):
    _no_slurm(monkeypatch)
    _write_lock(tmp_path, pid=_dead_pid(), slurm_job_id=None)
    with RunLock(tmp_path, "glip-pl fit") as lock:
        assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists(), "released on exit"
    assert [p.name for p in tmp_path.iterdir()] == [], "nothing left behind"


def test_slurm_requeue_of_the_same_job_passes_another_job_does_not(tmp_path, holder, monkeypatch):
    first = holder(tmp_path, SLURM_JOB_ID="4242")  # alive: as seen from the requeued job, it is the old allocation
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(RunLockHeld, match=rf"pid {first.pid}, Slurm job 4242"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_live_holder_and_other_hosts_are_not_taken_over(tmp_path, holder, monkeypatch):
    _no_slurm(monkeypatch)
    first = holder(tmp_path / "a")
    with pytest.raises(RunLockHeld, match=rf"pid {first.pid}.*it is running"):
        RunLock(tmp_path / "a").acquire()
    _write_lock(tmp_path / "b", host="some-other-node", pid=_dead_pid(), slurm_job_id=None)
    with pytest.raises(RunLockHeld, match="another host"):
        RunLock(tmp_path / "b").acquire()
    # the holder killed with SIGKILL: its lock stayed, but its pid is dead on this host, so it is stale
    first.kill()
    first.wait()
    assert (tmp_path / "a" / LOCK_NAME).exists()
    with RunLock(tmp_path / "a"):
        pass


def test_fit_releases_its_lock_in_process(tmp_path, synthetic_shards, monkeypatch):
    """``GLIPCLI`` (as the demo runs it, in-process) takes the lock for fit and gives it back when done."""
    from glip_pl.lit.cli import GLIPCLI

    seen = {}

    class NoFit(GLIPCLI):
        def _run_subcommand(self, subcommand):
            seen["during"] = (Path(self.trainer.default_root_dir) / LOCK_NAME).exists()

    _no_slurm(monkeypatch)
    cfg = tiny_recipe(tmp_path, synthetic_shards, steps=1)
    NoFit(args=["fit", *cfg.args])
    assert seen["during"] and not (tmp_path / "run" / LOCK_NAME).exists()
