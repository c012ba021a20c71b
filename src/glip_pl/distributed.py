"""Distributed helpers in one place (DESIGN.md practice 10): object gathering and rank queries.

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
