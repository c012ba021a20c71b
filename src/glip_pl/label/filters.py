"""Which of the teacher's detections become boxes, and which become ignore regions (``FilterConfig``)."""

from __future__ import annotations

from typing import Optional

import torch

from .config import FilterConfig


def _by_score(keep: list, scores) -> list:
    return sorted(keep, key=lambda k: (-float(scores[k]), k))


def filter_detections(det, P: int, f: FilterConfig) -> list:
    """Kept indices in descending score after threshold, optional cross-phrase NMS, per-phrase top-k and max boxes."""
    scores = det.scores.float().cpu()
    labels = det.labels.cpu()
    keep = _by_score(torch.nonzero(scores > f.score_thresh).flatten().tolist(), scores)
    if f.cross_phrase_nms is not None and len(keep) > 1:
        from torchvision.ops import nms

        idx = torch.tensor(keep)
        survivors = nms(det.boxes.float().cpu()[idx], scores[idx], float(f.cross_phrase_nms))
        keep = _by_score([keep[int(j)] for j in survivors], scores)
    if f.top_k is not None:
        per: dict = {}
        kk = []
        for k in keep:
            lab = int(labels[k])
            if per.get(lab, 0) < f.top_k:
                per[lab] = per.get(lab, 0) + 1
                kk.append(k)
        keep = kk
    return keep[: f.max_boxes]


def ignore_candidates(det, keep: list, f: FilterConfig) -> list:
    """Indices of the candidates that were not kept but score above ``f.ignore_thresh`` and overlap no kept box at
    IoU >= ``f.ignore_overlap`` (descending score); [] when the option is off."""
    if f.ignore_thresh is None:
        return []
    scores = det.scores.float().cpu()
    kept = set(keep)
    out = [k for k in torch.nonzero(scores > f.ignore_thresh).flatten().tolist() if k not in kept]
    if out and keep and f.ignore_overlap is not None:
        from torchvision.ops import box_iou

        boxes = det.boxes.float().cpu()
        iou = box_iou(boxes[torch.tensor(out)], boxes[torch.tensor(keep)]).max(dim=1).values
        out = [k for k, v in zip(out, iou.tolist()) if v < f.ignore_overlap]
    return _by_score(out, scores)


def clip_box(b: list, W: int, H: int) -> Optional[list]:
    """``b`` clipped to the W x H image (in place), or None when nothing is left of it."""
    b[0], b[2] = min(max(b[0], 0.0), W), min(max(b[2], 0.0), W)
    b[1], b[3] = min(max(b[1], 0.0), H), min(max(b[3], 0.0), H)
    return b if b[2] > b[0] and b[3] > b[1] else None
