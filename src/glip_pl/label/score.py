"""Score pseudo boxes against true boxes (the synthetic caption split keeps them in ``hidden``).

A pseudo box is a true positive when it overlaps a not-yet-matched true box at IoU >= ``iou`` and — with
``phrase_aware`` — its phrase spans overlap that true box's spans in the caption (the teacher grounded the right
phrase, not just some object). Pseudo boxes are matched greedily in descending score. Precision = TP / pseudo
boxes; recall = TP / true boxes of all *input* captions that were labelled or skipped (a skipped caption's true
boxes count as missed unless ``labelled_only``). The true positives' IoUs with their true boxes measure placement,
and their size ratio and centre offset tell a systematic error (e.g. a teacher drawing every box too large on images
of a new look) from scatter.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torchvision.ops import box_iou


def _overlap(a: list, b: list) -> bool:
    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)


def match_image(boxes, scores, spans, true_boxes, true_spans, iou: float = 0.5, phrase_aware: bool = True,
                matches: Optional[list] = None) -> int:
    """Number of true positives in one image; each is appended to ``matches`` as (pseudo index, true index, IoU)."""
    if len(boxes) == 0 or len(true_boxes) == 0:
        return 0
    ious = box_iou(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                   torch.tensor(true_boxes, dtype=torch.float64).reshape(-1, 4))
    taken = [False] * len(true_boxes)
    tp = 0
    for k in sorted(range(len(boxes)), key=lambda k: -scores[k]):
        best, best_j = iou, -1
        for j in range(len(true_boxes)):
            if taken[j] or float(ious[k, j]) < best:
                continue
            if phrase_aware and not _overlap(spans[k], true_spans[j]):
                continue
            best, best_j = float(ious[k, j]), j
        if best_j >= 0:
            taken[best_j] = True
            tp += 1
            if matches is not None:
                matches.append((k, best_j, best))
    return tp


def placement(pairs: list) -> dict:
    """Placement of matched boxes from (pseudo box, true box, IoU) triples: mean IoU, the share at IoU >= 0.75, the
    geometric mean of the side ratio sqrt(pseudo area / true area) (1 = no size bias; 1.15 = 15 % too large) and the
    mean centre distance in units of the true box's side sqrt(area). NaN for each when there are no pairs."""
    if not pairs:
        return {"matched_mean_iou": float("nan"), "matched_iou75": float("nan"),
                "matched_size_ratio": float("nan"), "matched_centre_offset": float("nan")}
    log_ratio = offset = 0.0
    for (x1, y1, x2, y2), (u1, v1, u2, v2), _ in pairs:
        area, true_area = (x2 - x1) * (y2 - y1), (u2 - u1) * (v2 - v1)
        log_ratio += 0.5 * math.log(area / true_area)
        offset += math.hypot((x1 + x2 - u1 - u2) / 2, (y1 + y2 - v1 - v2) / 2) / math.sqrt(true_area)
    n = len(pairs)
    return {"matched_mean_iou": sum(p[2] for p in pairs) / n, "matched_iou75": sum(p[2] >= 0.75 for p in pairs) / n,
            "matched_size_ratio": math.exp(log_ratio / n), "matched_centre_offset": offset / n}


def _truth_records(truth_dir: str, split: str) -> dict:
    """id -> (caption, boxes, spans, where) of the grounding records in ``truth_dir`` (a labelled sample)."""
    from ..data.reader import iter_samples

    out = {}
    for t in iter_samples(truth_dir, split=split, decode_images=False):
        where = f"{t.url}: sample {t.key or t.id}"
        if t.caption is None or t.spans is None:
            raise ValueError(f"{where}: 'kind' is {t.kind!r}; the truth must be grounding records (caption + spans)")
        if t.id in out:
            raise ValueError(f"{where}: 'id' {t.id!r} appears twice in the truth ({out[t.id][3]})")
        out[t.id] = (t.caption, t.boxes.tolist(), [[tuple(x) for x in sp] for sp in t.spans], where)
    return out


def score_pseudo(out_dir: str, split: str, input_dir: Optional[str] = None, iou: float = 0.5,
                 phrase_aware: bool = True, labelled_only: bool = False, truth_dir: Optional[str] = None) -> dict:
    """Precision / recall and placement of the pseudo boxes in ``out_dir`` against true boxes.

    The true boxes are each record's ``hidden`` ones (the synthetic caption split), or with ``truth_dir`` those of
    the grounding records there with the same id and caption (e.g. people's boxes for a sample of the captions):
    then only pseudo records with a truth record are scored, and a truth record the job did not label counts as
    missed unless ``labelled_only``. With ``input_dir`` (the caption shards; hidden truth only) the true boxes of
    captions the job skipped count as missed.
    """
    from ..data.reader import iter_samples

    truth = _truth_records(truth_dir, split) if truth_dir is not None else None
    tp = n_pred = n_true = unscored = 0
    seen, pairs = set(), []
    for s in iter_samples(out_dir, split=split, decode_images=False):
        where = f"{s.url}: sample {s.key or s.id}"
        if truth is not None:
            if s.id not in truth:
                unscored += 1
                continue
            caption, true_boxes, true_spans, twhere = truth[s.id]
            if caption != s.caption:
                raise ValueError(f"{where}: 'caption' {s.caption!r} differs from the truth's {caption!r} ({twhere})")
        elif not s.hidden:
            raise ValueError(f"{where}: 'hidden' is missing: no true boxes to score against (give truth_dir)")
        else:
            true_boxes, true_spans = s.hidden["boxes"], s.hidden["spans"]
        seen.add(s.id)
        boxes = s.boxes.tolist()
        n_pred += len(boxes)
        n_true += len(true_boxes)
        matches = []
        tp += match_image(boxes, list(s.scores or [1.0] * len(boxes)), [[tuple(x) for x in sp] for sp in s.spans],
                          true_boxes, true_spans, iou, phrase_aware, matches)
        pairs += [(boxes[k], true_boxes[j], v) for k, j, v in matches]
    if not labelled_only:
        if truth is not None:
            n_true += sum(len(t[1]) for i, t in truth.items() if i not in seen)
        elif input_dir is not None:
            for s in iter_samples(input_dir, split=split, decode_images=False):
                if s.id not in seen and s.hidden:
                    n_true += len(s.hidden["boxes"])
    return {"precision": tp / max(n_pred, 1), "recall": tp / max(n_true, 1), "tp": tp, "pseudo_boxes": n_pred,
            "true_boxes": n_true, "images": len(seen), "unscored_images": unscored, "iou": iou,
            "phrase_aware": phrase_aware, **placement(pairs)}  # of the true positives, against their true boxes
