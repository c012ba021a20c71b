"""Draw detections (boxes + phrase and score) on a PIL image with PIL.ImageDraw.

GLIP scores every phrase at every place, so one object usually carries boxes of several phrases, nearly equal. Drawn
one by one they stack several deep and whichever is painted last reads as the answer. Here the boxes of different
phrases that overlap (IoU >= ``group_iou``, 0.7) are one object: its best box is drawn once, with one tag holding the
best phrase and score in the normal font at the box's top-left corner and the runners-up smaller beyond it. Objects
are painted from the lowest best score up, so where two objects' tags overlap the better one is readable; tags are
moved (and long texts shortened) to stay inside the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128), (128, 128, 128),
)
GROUP_IOU = 0.7
MAX_RUNNERS_UP = 3  # more lines would hide the object under its own tag


def color_for(label: int) -> tuple:
    return PALETTE[int(label) % len(PALETTE)]


def _ink(col: tuple) -> tuple:
    return (0, 0, 0) if sum(col) > 380 else (255, 255, 255)


@dataclass
class PaintedLabel:
    """One label as painted: which object (index into ``objects``), which detection, its text and its rectangle."""

    object: int
    detection: int
    label: int
    text: str
    score: Optional[float]
    rect: tuple  # x0, y0, x1, y1 in image pixels, inclusive
    best: bool  # the object's top-scoring phrase


@dataclass
class Layout:
    """What ``render`` drew: ``objects`` (detection indices per object, best first) and ``labels`` in paint order."""

    objects: list
    labels: list


def group_objects(boxes, scores: Optional[Sequence] = None, iou: float = GROUP_IOU) -> list:
    """Detection indices grouped into objects, best first in each group, groups by their best score (highest first).
    A detection joins the best-scoring group whose best box it overlaps with IoU >= ``iou``."""
    import torch
    from torchvision.ops import box_iou

    n = len(boxes)
    if n == 0:
        return []
    b = torch.as_tensor([[float(v) for v in box] for box in boxes], dtype=torch.float64).reshape(n, 4)
    s = torch.as_tensor([float(v) for v in scores], dtype=torch.float64) if scores is not None else \
        -torch.arange(n, dtype=torch.float64)  # no scores: the given order is the ranking
    order = sorted(range(n), key=lambda i: (-float(s[i]), i))
    overlap = box_iou(b, b)
    groups: list = []
    for i in order:
        for g in groups:
            if overlap[g[0], i] >= iou:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def _fit(draw, text: str, font, max_w: int) -> tuple:
    """(text, (left, top, width, height)) shortened with "..." until it is at most ``max_w`` wide."""
    cut = text
    while True:
        l, t, r, b = draw.textbbox((0, 0), cut, font=font)
        if r - l <= max_w or len(cut) <= 1:
            return cut, (l, t, r - l, b - t)
        cut = cut[: max(1, len(cut) - 4)] + "..." if len(cut) > 4 else cut[:-1]


def render(image, boxes: Sequence, labels: Sequence[int], texts: Sequence[str], scores: Optional[Sequence] = None,
           width: Optional[int] = None, group_iou: float = GROUP_IOU) -> tuple:
    """(a copy of ``image`` with the detections drawn, its ``Layout``). See the module docstring for the rules."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    W, H = out.size
    width = width or max(1, round(min(W, H) / 250))
    size = max(10, min(W, H) // 40)
    big, small = _font(size), _font(max(8, round(size * 0.75)))
    pad = 2
    groups = group_objects(boxes, scores, group_iou)
    painted = []
    for k in reversed(range(len(groups))):  # lowest best score first: the best object ends on top
        group = groups[k]
        best = group[0]
        x1, y1, x2, y2 = [float(v) for v in boxes[best]]
        col = color_for(labels[best])
        draw.rectangle([x1, y1, x2, y2], outline=col, width=width)
        lines = []
        for rank, i in enumerate(group[: 1 + MAX_RUNNERS_UP]):
            caption = texts[i] if scores is None else f"{texts[i]} {float(scores[i]):.2f}"
            font = big if rank == 0 else small
            caption, (l, t, w, h) = _fit(draw, caption, font, W - 2 * pad - 1)
            lines.append((i, caption, font, l, t, w, h))
        while len(lines) > 1 and sum(h + 2 * pad for *_, h in lines) > H - 1:  # a tiny image: runners-up go
            lines.pop()
        tag_w = max(w for *_, w, _ in lines) + 2 * pad
        tag_h = sum(h + 2 * pad for *_, h in lines)
        tx = min(max(x1, 0.0), W - 1 - tag_w)
        above = y1 - tag_h >= 0  # the tag sits above the box, else inside its top
        ty = min(max(y1 - tag_h if above else y1, 0.0), H - 1 - tag_h)
        tx, ty = int(max(tx, 0)), int(max(ty, 0))
        rows, y = [], ty
        # the best line touches the box corner: runners-up stack away from the box
        for rank, (i, caption, font, l, t, w, h) in (reversed(list(enumerate(lines))) if above else enumerate(lines)):
            rows.append((rank, i, caption, font, l, t, (tx, y, tx + tag_w, y + h + 2 * pad - 1)))
            y += h + 2 * pad
        for rank, i, caption, font, l, t, rect in sorted(rows, key=lambda r: -r[0]):  # the best phrase last
            lc = color_for(labels[i])
            draw.rectangle(list(rect), fill=lc)
            draw.text((rect[0] + pad - l, rect[1] + pad - t), caption, fill=_ink(lc), font=font)
            painted.append(PaintedLabel(object=k, detection=i, label=int(labels[i]), text=caption,
                                        score=None if scores is None else float(scores[i]), rect=rect, best=rank == 0))
    return out, Layout(objects=groups, labels=painted)


def draw_boxes(image, boxes: Sequence, labels: Sequence[int], texts: Sequence[str], scores: Optional[Sequence] = None,
               width: Optional[int] = None, group_iou: float = GROUP_IOU):
    """A copy of ``image`` (PIL) with x1,y1,x2,y2 ``boxes`` outlined, coloured by label, captioned with text/score."""
    return render(image, boxes, labels, texts, scores, width=width, group_iou=group_iou)[0]


def render_prediction(image, prediction, threshold: float = 0.0, width: Optional[int] = None,
                      group_iou: float = GROUP_IOU) -> tuple:
    """(image, ``Layout``) of a ``Prediction`` (or ``Detections`` with ``phrases``) whose score is at least
    ``threshold``; layout detection indices refer to the detections kept, in their order."""
    dets = getattr(prediction, "detections", prediction)
    names = prediction.prompt.names if hasattr(prediction, "prompt") else list(getattr(dets, "phrases", []))
    keep = [i for i, s in enumerate(dets.scores.tolist()) if s >= threshold]
    labels = [int(dets.labels[i]) for i in keep]
    texts = [names[l] if l < len(names) else str(l) for l in labels]
    return render(image, [dets.boxes[i].tolist() for i in keep], labels, texts, [float(dets.scores[i]) for i in keep],
                  width=width, group_iou=group_iou)


def draw_prediction(image, prediction, threshold: float = 0.0, width: Optional[int] = None):
    """Draw a ``Prediction`` (or ``Detections`` with ``phrases``) whose score is at least ``threshold``."""
    return render_prediction(image, prediction, threshold, width=width)[0]


__all__ = ["draw_boxes", "draw_prediction", "render", "render_prediction", "group_objects", "Layout",
           "PaintedLabel", "color_for", "PALETTE", "GROUP_IOU"]
