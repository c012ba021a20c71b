"""One caption's pseudo-label: the teacher's detections, filtered, as a grounding record of the shards schema.

Prompt = the caption with its noun-phrase spans as the phrases to ground (as GLIP-L's pseudo data). A caption is
skipped, with its reason, when it has no phrase (``no_phrase: skip``), fewer than ``min_boxes`` kept boxes
(``too_few_boxes``; the official code resamples) or a phrase left without a box (``unboxed_phrase: skip``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..data.schema import SCHEMA_VERSION
from .config import LabelConfig
from .filters import clip_box, filter_detections, ignore_candidates


@dataclass
class CaptionLabel:
    id: str
    skip: Optional[str] = None  # the skip reason; None: ``record`` is written
    record: Optional[dict] = None
    candidate_scores: list = field(default_factory=list)  # every teacher score above the candidate floor
    kept_scores: list = field(default_factory=list)  # unrounded scores of the kept boxes
    phrases: int = 0
    truncated: bool = False


def label_caption(item: dict, det, cfg: LabelConfig, provenance: dict) -> CaptionLabel:
    """``item``: a reader sample; ``det``: the teacher's detections for it (None when it has no phrase)."""
    f, rec = cfg.filters, item["rec"]
    P = len(item["spans"])
    out = CaptionLabel(id=str(rec["id"]), phrases=P, truncated=bool(item["truncated"]))
    if P == 0 and f.no_phrase == "skip":
        out.skip = "no_phrase"
        return out
    boxes, spans, scores, labels, raw = [], [], [], [], []
    ignore_boxes, ignore_spans = [], []
    W, H = rec["width"], rec["height"]
    phrase_spans = [[list(map(int, s)) for s in sp] for sp in item["spans"]]
    if P:
        box_of = lambda k: [round(float(v), 2) for v in det.boxes[k].tolist()]  # noqa: E731
        all_scores = det.scores.float().cpu()
        floor = min(f.candidate_thresh, f.score_thresh)  # the teacher ran at the lowest threshold, ignore_thresh's
        out.candidate_scores = all_scores[all_scores > floor].tolist()
        kept = filter_detections(det, P, f)
        for k in kept:
            lab = int(det.labels[k])
            boxes.append(box_of(k))
            spans.append(phrase_spans[lab])
            scores.append(round(float(det.scores[k]), 4))
            raw.append(float(det.scores[k]))
            labels.append(lab)
        good = [j for j, b in enumerate(boxes) if clip_box(b, W, H) is not None]  # the schema wants boxes inside
        boxes, spans = [boxes[j] for j in good], [spans[j] for j in good]
        scores, labels, raw = [scores[j] for j in good], [labels[j] for j in good], [raw[j] for j in good]
        if len(boxes) < f.min_boxes:
            out.skip = "too_few_boxes"
            return out
        if f.unboxed_phrase == "skip" and len(set(labels)) < P:
            out.skip = "unboxed_phrase"
            return out
        whole = set()
        if f.unboxed_phrase == "ignore":  # no negatives anywhere for a phrase without a box
            whole = set(range(P)) - set(labels)
            for lab in sorted(whole):
                ignore_boxes.append([0.0, 0.0, float(W), float(H)])
                ignore_spans.append(phrase_spans[lab])
        for k in ignore_candidates(det, kept, f):
            lab = int(det.labels[k])
            b = clip_box(box_of(k), W, H)
            if lab in whole or b is None:  # already ignored everywhere / nothing inside the image
                continue
            ignore_boxes.append(b)
            ignore_spans.append(phrase_spans[lab])
    out.kept_scores = raw
    out.record = {
        "id": out.id, "source": cfg.source, "kind": "grounding",
        "width": int(W), "height": int(H), "caption": item["caption"],
        "boxes": boxes, "spans": spans, "scores": scores, "provenance": provenance,
        "extra": {**(rec.get("extra") or {}), "phrases": phrase_spans, "phrase_names": item["names"],
                  "box_phrases": labels, "input_source": rec.get("source"), "truncated": out.truncated},
        "schema": SCHEMA_VERSION, "image": rec.get("image") or "jpg",
    }
    if ignore_boxes:
        out.record["ignore_boxes"], out.record["ignore_spans"] = ignore_boxes, ignore_spans
    if rec.get("hidden") is not None:  # synthetic truth rides along for scoring; never trained on
        out.record["hidden"] = rec["hidden"]
    return out
