"""The labelling's quality report: the split's ``index.json`` entry merged from the shards' stats, its console
summary, and its W&B run (kept boxes and phrases per caption, score histograms, skip reasons)."""

from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Optional

import numpy as np

from ..data.writer import shard_name, stats_path

log = logging.getLogger(__name__)

HIST_BINS = 10  # score histogram over [0, 1]


def score_hist(scores) -> list:
    if len(scores) == 0:
        return [0] * HIST_BINS
    clipped = np.clip(np.asarray(scores, dtype=np.float64), 0, 1)
    return np.histogram(clipped, bins=HIST_BINS, range=(0.0, 1.0))[0].tolist()


def summarize(out_dir: str, out_split: str, n_shards: int) -> Optional[dict]:
    """Merge the per-shard stats into the split's index entry; None while some shards are unfinished."""
    stats = []
    for i in range(n_shards):
        name = shard_name(out_split, i)
        sp = stats_path(out_dir, name)
        if not os.path.exists(sp) or not os.path.exists(os.path.join(out_dir, name)):
            return None
        with open(sp) as f:
            stats.append(json.load(f))
    tot = lambda k: sum(s[k] for s in stats)  # noqa: E731
    skipped, skipped_ids = {}, {}
    for s in stats:
        for k, v in s["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        for k, v in s["skipped_ids"].items():
            skipped_ids.setdefault(k, []).extend(v)
    hist = lambda k: [sum(s[k][b] for s in stats) for b in range(HIST_BINS)]  # noqa: E731

    def merged(k):
        out: dict = {}
        for s in stats:
            for a, b in s[k].items():
                out[a] = out.get(a, 0) + b
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))

    labelled, n_input = tot("labelled"), tot("input")
    return {
        "shards": [{"name": s["name"], "count": s["count"], "bytes": s["bytes"], "input": s["input"]} for s in stats],
        "count": tot("count"), "bytes": tot("bytes"), "input": n_input, "labelled": labelled,
        "skipped": skipped, "skipped_total": sum(skipped.values()),
        "skipped_ids": {k: v[:100] for k, v in skipped_ids.items()},
        "quality": {
            "images": labelled,
            "phrases_per_caption": tot("phrases") / max(labelled, 1),
            "boxes_per_image": tot("boxes") / max(labelled, 1),
            "boxes": tot("boxes"), "candidates": tot("candidates"),
            "ignore_regions": sum(s.get("ignore_regions", 0) for s in stats),  # 0 in stats of earlier versions
            "kept_fraction": labelled / max(n_input, 1),
            "kept_box_fraction": tot("boxes") / max(tot("candidates"), 1),
            "truncated_captions": tot("truncated"),
            "score_hist_bins": [round(b / HIST_BINS, 2) for b in range(HIST_BINS + 1)],
            "candidate_score_hist": hist("score_hist"), "kept_score_hist": hist("kept_hist"),
            "phrases_per_caption_hist": merged("phrases_per_caption_hist"),
            "boxes_per_image_hist": merged("boxes_per_image_hist"),
        },
    }


def format_summary(entry: dict) -> str:
    q = entry["quality"]
    lines = [f"pseudo-label summary: {entry['input']} input captions → {entry['labelled']} labelled "
             f"({q['kept_fraction']:.1%}), skipped {entry['skipped_total']} {entry['skipped']}",
             f"  phrases/caption {q['phrases_per_caption']:.2f}   boxes/image {q['boxes_per_image']:.2f}   "
             f"boxes kept {q['boxes']} of {q['candidates']} candidates ({q['kept_box_fraction']:.1%})   "
             f"truncated captions {q['truncated_captions']}   ignore regions {q.get('ignore_regions', 0)}",
             "  score histogram (candidates | kept):"]
    bins = q["score_hist_bins"]
    for b in range(HIST_BINS):
        lines.append(f"    [{bins[b]:.1f}, {bins[b + 1]:.1f})  {q['candidate_score_hist'][b]:>8d} | "
                     f"{q['kept_score_hist'][b]:>8d}")
    return "\n".join(lines)


def finalize(cfg, n_shards: int, provenance: dict, phash: str) -> Optional[dict]:
    """Write the split's entry into ``index.json`` once every shard is finished; returns it (or None)."""
    from ..data.schema import SCHEMA_VERSION
    from ..data.shard_index import read_index, write_index

    entry = summarize(cfg.output, cfg.out_split, n_shards)
    if entry is None:
        return None
    entry.update(options=cfg.to_dict(), provenance=provenance, plan_hash=phash,
                 created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    index = read_index(cfg.output)
    index.update(schema_version=SCHEMA_VERSION, source=cfg.source, kind="grounding")
    index.setdefault("splits", {})[cfg.out_split] = entry
    write_index(cfg.output, index)
    return entry


def wandb_figures(entry: dict) -> dict:
    """The summary as W&B values: scalars under ``pseudo/``, histograms and per-caption counts as tables."""
    import wandb

    q = entry["quality"]
    out = {f"pseudo/{k}": v for k, v in q.items() if isinstance(v, (int, float))}
    out.update({"pseudo/input": entry["input"], "pseudo/labelled": entry["labelled"],
                "pseudo/skipped_total": entry["skipped_total"]})
    out.update({f"pseudo/skipped/{k}": v for k, v in entry["skipped"].items()})
    bins = q["score_hist_bins"]
    out["pseudo/score_hist"] = wandb.Table(
        columns=["bin", "candidates", "kept"],
        data=[[bins[b], q["candidate_score_hist"][b], q["kept_score_hist"][b]] for b in range(HIST_BINS)])
    for key, what in (("boxes_per_image_hist", "boxes"), ("phrases_per_caption_hist", "phrases")):
        out[f"pseudo/{key}"] = wandb.Table(columns=[what, "captions"], data=[[int(k), v] for k, v in q[key].items()])
    return out


def log_wandb(cfg, entry: dict) -> Optional[str]:
    """Log the summary as one W&B run under ``<output>/wandb`` (offline without an API key; the same run id on a
    re-run of the same output). Returns the run's folder; a W&B failure is a warning, as the labelling is done."""
    try:
        from ..lit.logging import GLIPWandbLogger

        logger = GLIPWandbLogger(save_dir=cfg.output, project=cfg.wandb_project, job_type="pseudo-label",
                                 config=cfg.to_dict())
        run = logger.experiment
        run.log(wandb_figures(entry))
        folder = os.path.dirname(run.dir)
        run.finish()
        return folder
    except Exception as e:  # noqa: BLE001 - W&B trouble must not fail a finished labelling
        log.warning("pseudo-label: the quality summary was not logged to W&B (%s: %s)", type(e).__name__, e)
        return None
