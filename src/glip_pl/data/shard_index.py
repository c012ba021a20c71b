"""``<folder>/index.json``: the record of which complete shards a folder holds, and its check against the files.

The index is the publication point of a conversion: the writer stages a split's shards in ``.<split>.staging/``,
drops the split from the index, moves the shards into place and writes the new entry last, so an entry describes
only the complete shards of one conversion, and an unfinished split is an error, never a partial set read as whole.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from .schema import ShardError

INDEX = "index.json"


def staging_dir(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, f".{split}.staging")


def read_index(out_dir: str) -> dict:
    path = os.path.join(out_dir, INDEX)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(path, "-", INDEX, f"unreadable index: {e}") from None
    if not isinstance(index, dict):
        raise ShardError(path, "-", INDEX, "the index must be a json object")
    return index


def write_index(out_dir: str, index: dict) -> None:
    path = os.path.join(out_dir, INDEX)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def unfinished(out_dir: str, split: Optional[str] = None) -> list:
    """Splits whose conversion started and has not published. ``.<split>.plan`` (older writers' marker) counts only
    for a named split: other tools keep ``.<name>.plan`` files too (the label job's ``.label.plan``)."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    found = {n[1:-len(".staging")] for n in names if n.startswith(".") and n.endswith(".staging")}
    if split is not None:
        return [split] if split in found or f".{split}.plan" in names else []
    return sorted(found)


def check_listed(out_dir: str, entry: dict, split: str) -> list:
    paths = []
    shards = entry.get("shards") if isinstance(entry, dict) else None
    if not isinstance(shards, list):
        raise ShardError(os.path.join(out_dir, INDEX), "-", f"splits.{split}.shards", "must be a list of shards")
    for i, s in enumerate(shards):
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ShardError(os.path.join(out_dir, INDEX), "-", f"splits.{split}.shards[{i}].name",
                             f"must be the file name of a shard in this folder, got {name!r}")
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            raise ShardError(path, "-", INDEX, f"shard listed for split {split!r} in {os.path.join(out_dir, INDEX)} "
                                               "is missing: the folder does not hold the conversion its index "
                                               "describes (an interrupted overwrite?); rerun the conversion")
        size = os.path.getsize(path)
        if "bytes" in s and size != s["bytes"]:
            raise ShardError(path, "-", INDEX, f"shard is {size} bytes but {os.path.join(out_dir, INDEX)} lists "
                                               f"{s['bytes']}: it belongs to another conversion; rerun the conversion")
        paths.append(path)
    return paths


def listed_shards(out_dir: str, split: Optional[str] = None) -> Optional[list]:
    """The checked shard paths of ``split`` (every split when None); None for a folder without an index."""
    index = read_index(out_dir)
    pending = unfinished(out_dir, split)
    if not index:
        if pending:
            raise ShardError(out_dir, "-", INDEX, f"the conversion of split(s) {', '.join(pending)} is unfinished "
                                                  "(interrupted or still running) and the folder has no index.json "
                                                  "yet: rerun or wait for the conversion")
        return None
    splits = index.get("splits") or {}
    wanted = [split] if split is not None else sorted(set(splits) | set(pending))
    paths = []
    for s in wanted:
        if s not in splits:
            why = ("its conversion is unfinished (interrupted or still running): rerun or wait for it"
                   if s in pending else f"it lists: {', '.join(sorted(splits)) or 'none'}")
            raise ShardError(os.path.join(out_dir, INDEX), "-", "splits", f"no shards for split {s!r}: {why}")
        paths += check_listed(out_dir, splits[s], s)
    return paths
