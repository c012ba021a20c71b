"""One square anchor per FPN location, level-major (P3 first), as the official generator (reference §1.5.4).

N = Σ_l H_l·W_l locations; boxes are x1, y1, x2, y2 in pixels of the network input.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .types import GLIPInputError

DEFAULT_STRIDES = (8, 16, 32, 64, 128)  # P3..P7


def _cell_anchor(stride: int, size: float, plus_one: bool) -> tuple[float, float, float, float]:
    if plus_one:
        # Official TO_REMOVE=1 convention: the base box is [0, 0, stride-1, stride-1] (centre (stride-1)/2) and a
        # box of size s spans centre ± (s-1)/2, e.g. P3 (stride 8, size 64) -> [-28, -28, 35, 35].
        c = 0.5 * (stride - 1)
        half = 0.5 * (size - 1)
    else:
        c = 0.5 * stride
        half = 0.5 * size
    return (c - half, c - half, c + half, c + half)


def make_anchors(
    level_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int] = DEFAULT_STRIDES,
    anchor_scale: float = 8.0,
    plus_one: bool = False,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Anchors of all levels, (N, 4), index = offset_l + y*W_l + x; side ``anchor_scale * stride``."""
    if len(level_sizes) > len(strides):
        raise GLIPInputError(f"{len(level_sizes)} level sizes but only {len(strides)} strides ({tuple(strides)})")
    out = []
    for (h, w), stride in zip(level_sizes, strides):
        h, w = int(h), int(w)
        if h < 0 or w < 0:
            raise GLIPInputError(f"level size must be non-negative, got {(h, w)}")
        cell = torch.tensor(_cell_anchor(stride, anchor_scale * stride, plus_one), dtype=torch.float64)
        # float64 so that large grids stay exact, then cast once.
        ys = torch.arange(h, dtype=torch.float64) * stride
        xs = torch.arange(w, dtype=torch.float64) * stride
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 4)
        out.append(shifts + cell)
    if not out:
        return torch.zeros(0, 4, dtype=dtype, device=device)
    return torch.cat(out, dim=0).to(device=device, dtype=dtype)
