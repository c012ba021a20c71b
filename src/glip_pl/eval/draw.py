"""Draw detections (boxes + phrase and score) on a PIL image with PIL.ImageDraw."""

from __future__ import annotations

from typing import Optional, Sequence

PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128), (128, 128, 128),
)


def color_for(label: int) -> tuple:
    return PALETTE[int(label) % len(PALETTE)]


def draw_boxes(image, boxes: Sequence, labels: Sequence[int], texts: Sequence[str], scores: Optional[Sequence] = None,
               width: Optional[int] = None):
    """A copy of ``image`` (PIL) with x1,y1,x2,y2 ``boxes`` outlined, coloured by label, captioned with text/score."""
    from PIL import ImageDraw, ImageFont

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    W, H = out.size
    width = width or max(1, round(min(W, H) / 250))
    try:
        font = ImageFont.load_default(size=max(10, min(W, H) // 40))
    except TypeError:  # Pillow < 10.1: no size argument
        font = ImageFont.load_default()
    for i, (box, lab, txt) in enumerate(zip(boxes, labels, texts)):
        x1, y1, x2, y2 = [float(v) for v in box]
        col = color_for(lab)
        draw.rectangle([x1, y1, x2, y2], outline=col, width=width)
        caption = txt if scores is None else f"{txt} {float(scores[i]):.2f}"
        l, t, r, b = draw.textbbox((0, 0), caption, font=font)
        tw, th = r - l, b - t
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 4, ty + th + 2], fill=col)
        draw.text((x1 + 2 - l, ty + 1 - t), caption, fill=(0, 0, 0) if sum(col) > 380 else (255, 255, 255), font=font)
    return out


def draw_prediction(image, prediction, threshold: float = 0.0, width: Optional[int] = None):
    """Draw a ``Prediction`` (or ``Detections`` with ``phrases``) whose score is at least ``threshold``."""
    dets = getattr(prediction, "detections", prediction)
    names = prediction.prompt.names if hasattr(prediction, "prompt") else list(getattr(dets, "phrases", []))
    keep = [i for i, s in enumerate(dets.scores.tolist()) if s >= threshold]
    labels = [int(dets.labels[i]) for i in keep]
    texts = [names[l] if l < len(names) else str(l) for l in labels]
    return draw_boxes(image, [dets.boxes[i].tolist() for i in keep], labels, texts,
                      [float(dets.scores[i]) for i in keep], width=width)


__all__ = ["draw_boxes", "draw_prediction", "color_for", "PALETTE"]
