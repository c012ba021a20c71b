"""Writing the pseudo-labelled grounding shards: one output shard per input shard, with its accounting beside it.

Same members, tar metadata, naming and stats file as ``glip_pl.data.writer``; a shard is written under a temporary
name, then its ``.<name>.stats.json``, then renamed, so a shard under its final name is complete and accounted for
(the job's resume reads exactly that).
"""

from __future__ import annotations

import json
import os
import tarfile

from ..data.schema import Where, validate_record
from ..data.writer import add_member, dumps, stats_path
from .record import CaptionLabel
from .summary import HIST_BINS, score_hist


class ShardAccumulator:
    """Per output shard: the labelled records in input order and the shard's accounting."""

    def __init__(self):
        self.samples: list = []  # (record, reader item)
        self.stats = {"input": 0, "labelled": 0, "skipped": {}, "skipped_ids": {}, "phrases": 0, "boxes": 0,
                      "candidates": 0, "ignore_regions": 0, "truncated": 0, "score_hist": [0] * HIST_BINS,
                      "kept_hist": [0] * HIST_BINS, "phrases_per_caption_hist": {}, "boxes_per_image_hist": {}}

    def skip(self, sid: str, reason: str) -> None:
        s = self.stats
        s["input"] += 1
        s["skipped"][reason] = s["skipped"].get(reason, 0) + 1
        s["skipped_ids"].setdefault(reason, []).append(sid)

    def add(self, lab: CaptionLabel, item: dict) -> None:
        st = self.stats
        if lab.candidate_scores:
            st["candidates"] += len(lab.candidate_scores)
            st["score_hist"] = [a + b for a, b in zip(st["score_hist"], score_hist(lab.candidate_scores))]
        if lab.skip is not None:
            self.skip(lab.id, lab.skip)
            return
        rec = lab.record
        st["input"] += 1
        st["kept_hist"] = [a + b for a, b in zip(st["kept_hist"], score_hist(lab.kept_scores))]
        self.samples.append((rec, item))
        st["labelled"] += 1
        st["phrases"] += lab.phrases
        st["boxes"] += len(rec["boxes"])
        st["ignore_regions"] += len(rec.get("ignore_boxes", ()))
        st["truncated"] += int(lab.truncated)
        for key, v in (("phrases_per_caption_hist", lab.phrases), ("boxes_per_image_hist", len(rec["boxes"]))):
            st[key][str(v)] = st[key].get(str(v), 0) + 1


def write_output_shard(out_dir: str, name: str, acc: ShardAccumulator) -> None:
    """Write one output shard under a temporary name, then its stats, then rename the shard (complete = named)."""
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for n, (rec, item) in enumerate(acc.samples):
                validate_record(rec, Where(file=name, record=rec["id"]), clip_tolerance=0.0)
                key = f"{n:09d}"
                add_member(tar, f"{key}.{rec['image']}", item["image_bytes"])
                add_member(tar, f"{key}.json", dumps(rec).encode("utf-8"))
        st = dict(acc.stats, name=name, count=len(acc.samples), bytes=os.path.getsize(tmp))
        sp = stats_path(out_dir, name)
        with open(sp + ".tmp", "w") as f:
            json.dump(st, f)
        os.replace(sp + ".tmp", sp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
