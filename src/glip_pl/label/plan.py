"""The labelling plan and its resumption: which rank labels which input shards, which are finished, and the hash
that keeps shards of different labellings (other input, teacher or options) out of one folder."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict

from ..data.writer import dumps, shard_name, stats_path
from .config import LabelConfig

PLAN_FILE = ".label.plan"


def plan_hash(cfg: LabelConfig, shards: list, teacher_sha: str) -> str:
    ph = {k: v for k, v in cfg.phrases.to_dict().items() if k not in ("batch_size", "n_process")}
    filters = asdict(cfg.filters)
    if filters["unboxed_phrase"] == "keep":  # the default: earlier plans (before the option existed) keep their hash
        del filters["unboxed_phrase"]
    if filters["ignore_thresh"] is None:  # likewise (ignore_overlap means nothing without it)
        del filters["ignore_thresh"], filters["ignore_overlap"]
    plan = {"shards": [os.path.basename(s) for s in shards], "teacher": teacher_sha, "phrases": ph,
            "filters": filters, "min_size": cfg.min_size, "max_size": cfg.max_size,
            "source": cfg.source, "split": cfg.out_split}
    return hashlib.sha256(dumps(plan).encode()).hexdigest()


def check_plan(out_dir: str, phash: str, overwrite: bool, write: bool) -> None:
    """Refuse to mix shards of another labelling (other input, teacher or options) into ``out_dir``."""
    path = os.path.join(out_dir, PLAN_FILE)
    old = open(path).read().strip() if os.path.exists(path) else None
    existing = [n for n in os.listdir(out_dir) if n.endswith(".tar") or n.endswith(".stats.json")]
    if old != phash and existing:
        if not overwrite:
            raise FileExistsError(f"{out_dir} holds shards of another labelling run (other input, teacher or "
                                  "options); pass overwrite: true (--overwrite) to replace them")
        if write:
            for n in existing + ["index.json"]:
                if os.path.exists(os.path.join(out_dir, n)):
                    os.remove(os.path.join(out_dir, n))
    if write:
        with open(path + ".tmp", "w") as f:
            f.write(phash + "\n")
        os.replace(path + ".tmp", path)


def rank_shards(n: int, rank: int, world: int) -> list:
    """Input shard positions labelled by ``rank``: r, r+W, r+2W, ..."""
    return list(range(rank, n, world))


def finished(out_dir: str, name: str) -> bool:
    return os.path.exists(os.path.join(out_dir, name)) and os.path.exists(stats_path(out_dir, name))


def todo_shards(out_dir: str, out_split: str, mine: list) -> list:
    """Of ``mine``, the shards not finished by an earlier run (final name and stats both present); removes the
    temporaries a killed run left for them."""
    todo = []
    for i in mine:
        name = shard_name(out_split, i)
        for n in os.listdir(out_dir):
            if n.startswith(f".{name}.tmp-"):
                os.remove(os.path.join(out_dir, n))
        if not finished(out_dir, name):
            todo.append(i)
    return todo
