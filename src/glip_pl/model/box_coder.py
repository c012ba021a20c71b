"""Faster R-CNN box deltas, IoU and NMS, with the official +1 width convention optional (reference §1.5.4, §6).

Boxes are x1, y1, x2, y2; ``...`` leading dims broadcast. With ``plus_one`` (the official TO_REMOVE=1) a box covers the pixels x1..x2 inclusive,
so its width is x2 - x1 + 1; without it (our default) coordinates are continuous and the width is x2 - x1.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torchvision
from torch import Tensor

from .types import GLIPInputError

BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # dw/dh clamp, as the official BoxCoder


class BoxCoder:
    """GT boxes ⇄ deltas relative to anchors."""

    def __init__(
        self,
        weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        plus_one: bool = False,
        bbox_xform_clip: float = BBOX_XFORM_CLIP,
    ):
        if len(weights) != 4:
            raise GLIPInputError(f"BoxCoder needs 4 weights (wx, wy, ww, wh), got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.plus_one = bool(plus_one)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, plus_one={self.plus_one})"

    def _ctr_size(self, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x1, y1, x2, y2 = boxes.unbind(-1)
        extra = 1.0 if self.plus_one else 0.0
        w = x2 - x1 + extra
        h = y2 - y1 + extra
        return x1 + 0.5 * w, y1 + 0.5 * h, w, h

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        anchors = anchors.to(gt_boxes.dtype)
        ax, ay, aw, ah = self._ctr_size(anchors)
        gx, gy, gw, gh = self._ctr_size(gt_boxes)
        wx, wy, ww, wh = self.weights
        return torch.stack(
            [wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)], dim=-1
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        anchors = anchors.to(deltas.dtype)
        ax, ay, aw, ah = self._ctr_size(anchors)
        wx, wy, ww, wh = self.weights
        dx, dy, dw, dh = deltas.unbind(-1)
        dw = torch.clamp(dw / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(dh / wh, max=self.bbox_xform_clip)
        cx = dx / wx * aw + ax
        cy = dy / wy * ah + ay
        w = torch.exp(dw) * aw
        h = torch.exp(dh) * ah
        extra = 1.0 if self.plus_one else 0.0  # official: x2 = ctr + 0.5*w - 1
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - extra, cy + 0.5 * h - extra], dim=-1)


def _shift(boxes: Tensor, plus_one: bool) -> Tensor:
    """Under the +1 convention x2+1, y2+1, so that continuous-box formulas give the +1 areas and IoUs."""
    if not plus_one:
        return boxes
    return boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


def box_iou(a: Tensor, b: Tensor, plus_one: bool = False) -> Tensor:
    """Pairwise IoU, (..., N, 4) x (..., M, 4) -> (..., N, M); under ``plus_one`` see :func:`_shift`."""
    return torchvision.ops.box_iou(_shift(a, plus_one), _shift(b, plus_one))


def nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou: float, plus_one: bool = False) -> Tensor:
    """Per-label NMS, kept indices by decreasing score. float64: ``batched_nms`` may separate labels by adding
    label*max_coordinate to the boxes, which loses precision in float32 with many labels (image*phrase keys)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    shifted = _shift(boxes.to(torch.float64), plus_one)
    return torchvision.ops.batched_nms(shifted, scores.to(torch.float64), labels, float(iou))
