"""Shard writing: deterministic, parallel, resumable WebDataset tars plus ``index.json``.

Every converter hands ``write_split`` a list of small picklable records and a module-level ``build`` function that
turns one record into (json record, encoded image bytes, image extension, ``Where``). The writer
  1. rejects duplicate ids (``duplicate_id``),
  2. plans shards by a target byte size from each record's ``size_hint`` (so the plan, and the bytes, do not depend
     on the number of processes),
  3. builds and validates every sample in worker processes (``schema.validate_record`` + ``probe_image``),
     writing each shard to a temporary name and renaming it when complete,
  4. stages the shards in ``<out>/.<split>.staging/`` and skips those an earlier run of the same plan finished
     (resume), and
  5. publishes: drops the split from ``<out>/index.json``, moves the shards into place, and writes the split's entry
     (shard counts and sizes, error counts, options) last (``shard_index``). A conversion killed at any point
     leaves the old complete set listed, or no listed split at all (readers then name the unfinished conversion).
Tar members carry fixed metadata (mtime 0, uid 0, mode 0644) so the same input gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Optional, Sequence

from .schema import SCHEMA_VERSION, ConversionError, ShardError, Where, probe_image, validate_record
from .shard_index import check_listed, read_index, staging_dir, write_index

PUBLISHING = "publishing"  # marker in the staging folder: every shard is written and they are being moved

log = logging.getLogger(__name__)

DEFAULT_TARGET_BYTES = 256 * 1024 * 1024  # large enough to amortise opens, small enough to split across workers
TAR_OVERHEAD = 3 * 512  # two member headers + padding (estimate for planning)
MAX_LISTED_SKIPS = 100  # ids listed per error code in index.json (all are counted)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def plan_shards(size_hints: Sequence[int], target_bytes: int, max_count: Optional[int] = None) -> list:
    """Cut consecutive records into shards: a shard closes once it reaches ``target_bytes`` or ``max_count``."""
    plan, cur, size = [], [], 0
    for i, s in enumerate(size_hints):
        cur.append(i)
        size += int(s) + TAR_OVERHEAD
        if size >= target_bytes or (max_count is not None and len(cur) >= max_count):
            plan.append(cur)
            cur, size = [], 0
    if cur:
        plan.append(cur)
    return plan


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` as ``name`` with fixed metadata, so equal input gives byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def _write_shard(job: dict) -> dict:
    """Build, validate and write one shard (runs in a worker process). Returns its stats."""
    out_dir, name, build = job["out_dir"], job["name"], job["build"]
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}")
    stats = {"name": name, "count": 0, "skipped": {}, "skipped_ids": {}, "clipped_boxes": 0}
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for index, record in zip(job["indices"], job["records"]):
                    try:
                        rec, image, ext, where, image_path = build(record)
                        w, h, _ = probe_image(image, where, image_path, job["verify"])
                        if rec.get("width") is None or rec.get("height") is None:
                            rec["width"], rec["height"] = w, h
                        elif (rec["width"], rec["height"]) != (w, h):
                            raise where.error("image_size_mismatch", "width/height",
                                              f"annotation says {rec['width']}x{rec['height']} but the image "
                                              f"{image_path} is {w}x{h}" + (
                                                  " once turned upright by its EXIF orientation (annotations "
                                                  "must refer to the upright image)"
                                                  if (rec["width"], rec["height"]) == (h, w) else ""))
                        stats["clipped_boxes"] += validate_record(rec, where, job["clip_tolerance"])
                    except ConversionError as e:
                        if job["on_error"] != "skip":
                            raise
                        stats["skipped"][e.code] = stats["skipped"].get(e.code, 0) + 1
                        stats["skipped_ids"].setdefault(e.code, []).append(str(record.get("id")))
                        continue
                    rec["schema"], rec["image"] = SCHEMA_VERSION, ext
                    key = f"{index:09d}"
                    add_member(tar, f"{key}.{ext}", image)
                    add_member(tar, f"{key}.json", dumps(rec).encode("utf-8"))
                    stats["count"] += 1
        stats["bytes"] = os.path.getsize(tmp)
        with open(stats_path(out_dir, name) + ".tmp", "w") as f:
            json.dump(stats, f)
        os.replace(stats_path(out_dir, name) + ".tmp", stats_path(out_dir, name))
        os.replace(tmp, final)  # the shard exists under its final name only when complete
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return stats


def stats_path(out_dir: str, name: str) -> str:
    """A shard's accounting, hidden beside it: written before the shard is renamed, so a named shard has one."""
    return os.path.join(out_dir, f".{name}.stats.json")


def check_duplicate_ids(records: list, file: str, on_error: str) -> tuple:
    """Keep the first record of each id; a repeat is ``duplicate_id`` (raised, or skipped and counted)."""
    seen, kept, skipped = set(), [], []
    for r in records:
        rid = str(r["id"])
        if rid in seen:
            if on_error != "skip":
                raise ConversionError("duplicate_id", file, rid, "id", f"id {rid!r} appears more than once")
            skipped.append(rid)
            continue
        seen.add(rid)
        kept.append(r)
    return kept, skipped


def write_split(
    out_dir: str,
    split: str,
    records: list,
    build: Callable,
    *,
    source: str,
    kind: str,
    source_file: str = "",
    categories: Optional[list] = None,
    options: Optional[dict] = None,
    target_bytes: int = DEFAULT_TARGET_BYTES,
    max_count: Optional[int] = None,
    num_workers: Optional[int] = None,
    on_error: str = "raise",
    verify: str = "full",
    clip_tolerance: float = 1.0,
    overwrite: bool = False,
    progress: bool = True,
    pre_skipped: Optional[dict] = None,
) -> dict:
    """Write ``records`` as ``<out_dir>/<split>-%06d.tar`` and merge the split into ``index.json``.

    ``pre_skipped`` are error counts ({code: [ids]}) the converter already skipped while reading its input
    (e.g. crowd boxes are not errors and are reported in ``options``/``dropped``). Returns the split's index entry.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    os.makedirs(out_dir, exist_ok=True)
    records, dup = check_duplicate_ids(records, source_file, on_error)
    skipped_ids = {k: list(v) for k, v in (pre_skipped or {}).items()}
    if dup:
        skipped_ids.setdefault("duplicate_id", []).extend(dup)
    plan = plan_shards([r.get("size_hint", 0) for r in records], target_bytes, max_count)
    options = dict(options or {})
    options.update(on_error=on_error, verify=verify, clip_tolerance=clip_tolerance, target_bytes=target_bytes,
                   max_count=max_count)
    h = hashlib.sha256(dumps({"schema": SCHEMA_VERSION, "options": options, "source": source, "kind": kind,
                              "plan": [[str(records[i]["id"]) for i in s] for s in plan]}).encode())
    plan_hash = h.hexdigest()
    names = [shard_name(split, i) for i in range(len(plan))]

    index = read_index(out_dir)
    entry = (index.get("splits") or {}).get(split)
    stage = staging_dir(out_dir, split)
    plan_file = os.path.join(stage, "plan")
    if not overwrite and entry and entry.get("plan_hash") == plan_hash and _intact(out_dir, entry, split):
        if os.path.isdir(stage):
            shutil.rmtree(stage)  # unpublished work of another conversion, abandoned
        log.info("%s/%s: up to date (%d shards)", out_dir, split, len(names))
        return entry
    same_stage = _read_text(plan_file) == plan_hash
    same_legacy = _read_text(os.path.join(out_dir, f".{split}.plan")) == plan_hash  # writers before staging
    published = [n for n in os.listdir(out_dir) if n.startswith(f"{split}-") and n.endswith(".tar")]
    if published and not overwrite and not (same_stage or same_legacy or (entry or {}).get("plan_hash") == plan_hash):
        raise FileExistsError(
            f"{out_dir} already holds {split} shards from a different conversion (other input or options); "
            "pass --overwrite to replace them")
    if os.path.isdir(stage) and not same_stage:
        log.info("%s/%s: discarding the unfinished staged shards of another conversion", out_dir, split)
        shutil.rmtree(stage)  # never published, so nothing that was readable is lost
    os.makedirs(stage, exist_ok=True)
    if not same_stage:
        with open(plan_file + ".tmp", "w") as f:
            f.write(plan_hash + "\n")
        os.replace(plan_file + ".tmp", plan_file)
    for n in os.listdir(stage):  # temporaries of an interrupted run
        if ".tmp" in n:
            os.remove(os.path.join(stage, n))

    jobs, stats = [], {}
    publishing = os.path.exists(os.path.join(stage, PUBLISHING))
    for name, idx in zip(names, plan):
        sp = stats_path(stage, name)
        # finished by an earlier run: still staged, or already moved into place by an interrupted publish (only
        # then may a shard of that name in the folder be ours: before, it is the old conversion's)
        if os.path.exists(sp) and (os.path.exists(os.path.join(stage, name))
                                   or (publishing and os.path.exists(os.path.join(out_dir, name)))):
            with open(sp) as f:
                stats[name] = json.load(f)
            continue
        jobs.append(dict(out_dir=stage, name=name, indices=idx, records=[records[i] for i in idx], build=build,
                         on_error=on_error, verify=verify, clip_tolerance=clip_tolerance))
    if stats:
        log.info("%s/%s: resuming, %d of %d shards already written", out_dir, split, len(stats), len(names))
    _run_jobs(jobs, stats, num_workers, progress, desc=f"{source}/{split}")

    skipped = {}
    for name in names:
        for code, ids in stats[name]["skipped_ids"].items():
            skipped_ids.setdefault(code, []).extend(ids)
    for code, ids in skipped_ids.items():
        skipped[code] = len(ids)
    entry = {
        "shards": [{"name": n, "count": stats[n]["count"], "bytes": stats[n]["bytes"]} for n in names],
        "count": sum(stats[n]["count"] for n in names),
        "bytes": sum(stats[n]["bytes"] for n in names),
        "skipped": skipped,
        "skipped_total": sum(skipped.values()),
        "skipped_ids": {k: v[:MAX_LISTED_SKIPS] for k, v in skipped_ids.items()},
        "clipped_boxes": sum(stats[n]["clipped_boxes"] for n in names),
        "options": options,
        "plan_hash": plan_hash,
        "source_file": str(source_file),
    }
    top = dict(schema_version=SCHEMA_VERSION, source=source, kind=kind)
    if categories is not None:
        top["categories"] = categories
    _publish(out_dir, split, stage, names, entry, top)
    if entry["skipped_total"]:
        log.warning("%s/%s: skipped %d records: %s", out_dir, split, entry["skipped_total"], skipped)
    return entry


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _intact(out_dir: str, entry: dict, split: str) -> bool:
    try:
        check_listed(out_dir, entry, split)
        return True
    except ShardError:
        return False


def _publish(out_dir: str, split: str, stage: str, names: list, entry: dict, top: dict) -> None:
    """Swap the staged shards in for the split's old ones; the index never lists a shard that is not complete."""
    index = read_index(out_dir)  # re-read here and below: another split may have been written meanwhile
    if split in (index.get("splits") or {}):
        del index["splits"][split]  # from here until the new entry, readers are told the conversion is unfinished
        write_index(out_dir, index)
    with open(os.path.join(stage, PUBLISHING), "w"):
        pass  # from here a shard missing from the stage has been moved into place (see the resume in write_split)
    for n in os.listdir(out_dir):  # the old conversion's shards beyond the new count, and old-style temporaries
        if (n.startswith(f"{split}-") and n.endswith(".tar") and n not in names) or n.startswith(f".{split}-"):
            os.remove(os.path.join(out_dir, n))
    for n in names:
        if os.path.exists(os.path.join(stage, n)):  # else moved already by an interrupted publish
            os.replace(os.path.join(stage, n), os.path.join(out_dir, n))
    index = read_index(out_dir)
    index.update(top)
    index.setdefault("splits", {})[split] = entry
    write_index(out_dir, index)  # last: the publication point
    shutil.rmtree(stage)
    legacy = os.path.join(out_dir, f".{split}.plan")
    if os.path.exists(legacy):
        os.remove(legacy)


def _ignore_sigint() -> None:
    """Worker processes leave Ctrl-C to the parent, which stops them (no traceback from every worker)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's workers now: a shard in progress would otherwise finish first (minutes for large ones).
    Their temporaries stay in the staging folder and the next run removes them."""
    stop = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if stop is not None:
        stop()
        return
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        p.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _run_jobs(jobs: list, stats: dict, num_workers: Optional[int], progress: bool, desc: str) -> None:
    from tqdm import tqdm

    total = sum(len(j["records"]) for j in jobs)
    n = min(num_workers or os.cpu_count() or 1, max(len(jobs), 1))
    with tqdm(total=total, desc=desc, unit="sample", disable=not progress or not jobs) as bar:
        if n <= 1:
            for job in jobs:
                stats[job["name"]] = _write_shard(job)
                bar.update(len(job["records"]))
            return
        ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_ignore_sigint) as pool:
            futures = {pool.submit(_write_shard, job): job for job in jobs}
            try:
                for fut in as_completed(futures):
                    st = fut.result()  # re-raises a worker's ConversionError with its fields
                    stats[st["name"]] = st
                    bar.update(len(futures[fut]["records"]))
            except KeyboardInterrupt:
                _stop_workers(pool)
                raise
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise


def build_in_memory(record: dict):
    """Build function for records that already hold their image bytes (see ``write_samples``)."""
    rec = json.loads(json.dumps(record["json"]))
    where = Where(file=record.get("file", "<memory>"), record=f"id {record['id']}",
                  box_fields=record.get("box_fields"))
    return rec, record["image"], record.get("ext", "jpg"), where, record.get("file", "<memory>")


def write_samples(out_dir: str, split: str, samples: list, *, source: str, kind: str, **kw) -> dict:
    """Write samples held in memory — each {"json": stored record, "image": encoded bytes, "ext": "jpg"} — with
    the same validation, sharding and index as the converters (e.g. pseudo-labelled captions: kind "grounding"
    with ``scores`` and ``provenance``)."""
    records = [{"id": str(s["json"]["id"]), "json": s["json"], "image": s["image"], "ext": s.get("ext", "jpg"),
                "size_hint": len(s["image"]) + 512} for s in samples]
    return write_split(out_dir, split, records, build_in_memory, source=source, kind=kind, **kw)
