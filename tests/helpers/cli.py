"""``glip-pl`` in subprocesses, offline: one run, one started process, or n processes as n simulated nodes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

# set by a launcher (srun, torchrun, a test's own pair) and read by Lightning's cluster detection: a node of a
# simulated job must not inherit the outer job's
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")


def cli_env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
            **extra}


def glip_pl(*args, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glip_pl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(**env))


def popen(*args, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "glip_pl.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(**env))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(*args, nodes: int = 2, **env) -> list:
    """``glip-pl ARGS`` as node 0 .. nodes-1 of a ``nodes`` x 1-device job on 127.0.0.1 (gloo on CPU)."""
    port, procs = free_port(), []
    for node in range(nodes):
        full = cli_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node), WORLD_SIZE=str(nodes),
                       **env)
        for var in LAUNCHER_VARS:
            full.pop(var, None)
        procs.append(subprocess.Popen([sys.executable, "-m", "glip_pl.cli", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=full))
    return procs


def wait_all(procs: list, timeout: float = 300) -> list:
    """[(returncode, stdout, stderr)] of every process, within one shared deadline; stragglers are killed."""
    out, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            o, e = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out
