"""Distributed helpers in one place (DESIGN.md practice 10): object gathering (to every rank or to rank 0) and rank
queries.

Nothing in ``glip_pl.model`` imports this module.
"""

from __future__ import annotations

import datetime
import os

import torch


def is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_dist() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return torch.distributed.get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", 1))


def launch_rank_world() -> tuple:
    """(global rank, world size) as the launcher tells them, before any process group exists.

    torchrun sets RANK/WORLD_SIZE, Slurm SLURM_PROCID/SLURM_NTASKS; hand-launched nodes (Lightning's NODE_RANK /
    LOCAL_RANK) only tell node and local rank, and anything but node 0, local rank 0 is not rank 0.
    """
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if os.environ.get(r, "").isdigit():
            return int(os.environ[r]), int(os.environ.get(w, "1") or 1)
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return (0 if node == 0 and local == 0 else max(node, 1) * 1000 + local), 1


def gather_objects(items: list, timeout_s: float | None = None) -> list:
    """Concatenate a per-rank list of picklable objects on every rank (all_gather_object).

    Used for evaluation results, which are small (boxes and scores per image); every rank returns the full list.
    ``timeout_s`` bounds the wait through a monitored barrier first (gloo) so one stuck rank is reported, not hung.
    """
    if not is_dist():
        return list(items)
    if timeout_s is not None and torch.distributed.get_backend() == "gloo":
        torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
    out: list = [None] * world_size()
    torch.distributed.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def gather_on_rank0(obj) -> list | None:
    """Every rank's ``obj`` on rank 0, None on the others; ``[obj]`` without a process group. No barrier after it,
    so a long evaluation on rank 0 does not hold the other ranks at a collective past its timeout."""
    if not is_dist() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out
