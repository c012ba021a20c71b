"""ATSS anchor assignment (reference §2.1; Zhang et al. 2020), vectorised over the batch and the GT boxes.

C = Σ_l min(topk, N_l) candidate anchors per GT: per level, the ``topk`` anchors whose centres are closest to the
GT centre. A candidate is positive when its IoU >= mean + std (unbiased) of that GT's candidate IoUs and its centre
lies strictly inside the GT; an anchor positive for several GTs takes the one with the highest IoU.
Ties, which the official ``topk``/``max`` leave to the kernel, go to the lower anchor index and the lower GT index.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .box_coder import box_iou
from .types import GLIPInputError

INSIDE_EPS = 0.01  # official: min(l, t, r, b) > 0.01


def _centres(boxes: Tensor) -> Tensor:
    """(..., 4) -> (..., 2); plain (x1+x2)/2, as the official ATSS for both conventions."""
    return torch.stack([(boxes[..., 0] + boxes[..., 2]) / 2.0, (boxes[..., 1] + boxes[..., 3]) / 2.0], dim=-1)


def _nearest(dist: Tensor, k: int) -> Tensor:
    """Indices (ascending) of the k smallest values along the last dim; ties at the k-th value go to lower indices.

    The same set as a stable sort's first k, for about the cost of two ``topk`` (a full sort is much slower on CPU).
    """
    n = dist.shape[-1]
    kth = dist.topk(k, dim=-1, largest=False).values.amax(-1, keepdim=True)
    # Fewer than k values are below the k-th; they all get the top key (2n), the tied ones n - index (lower index
    # first; exact in float32 for n < 2**24), the rest 0: the k largest keys are the wanted set.
    pos = n - torch.arange(n, device=dist.device, dtype=torch.float32)
    key = torch.where(dist < kth, 2.0 * n, torch.where(dist == kth, pos, 0.0))
    return key.topk(k, dim=-1).indices.sort(-1).values


def _sq_dist(a_ctr: Tensor, g_ctr: Tensor) -> Tensor:
    """Squared centre distances, broadcast over leading dims (the same arithmetic in both implementations)."""
    dx = a_ctr[..., 0] - g_ctr[..., 0]
    dy = a_ctr[..., 1] - g_ctr[..., 1]
    return dx * dx + dy * dy


def _check(anchors: Tensor, num_anchors_per_level: Sequence[int], gt_boxes: Tensor, gt_valid: Tensor
           ) -> tuple[int, int, int]:
    """B, M, N of valid inputs; one clear error otherwise."""
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise GLIPInputError(f"anchors must be (N, 4), got {tuple(anchors.shape)}")
    if sum(int(n) for n in num_anchors_per_level) != anchors.shape[0]:
        raise GLIPInputError(
            f"num_anchors_per_level {list(num_anchors_per_level)} sums to {sum(num_anchors_per_level)}, "
            f"but there are {anchors.shape[0]} anchors"
        )
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise GLIPInputError(f"gt_boxes must be (B, M, 4), got {tuple(gt_boxes.shape)}")
    if tuple(gt_valid.shape) != tuple(gt_boxes.shape[:2]):
        raise GLIPInputError(f"gt_valid must be (B, M) = {tuple(gt_boxes.shape[:2])}, got {tuple(gt_valid.shape)}")
    return gt_valid.shape[0], gt_valid.shape[1], anchors.shape[0]


@torch.no_grad()
def atss_assign(
    anchors_N4: Tensor,
    num_anchors_per_level: Sequence[int],
    gt_boxes_BM4: Tensor,
    gt_valid_BM: Tensor,
    topk: int = 9,
    plus_one: bool = False,
) -> Tensor:
    """Index into M of the GT matched to each anchor, -1 for background: (B, N) long. Runs in float32."""
    B, M, N = _check(anchors_N4, num_anchors_per_level, gt_boxes_BM4, gt_valid_BM)
    device = anchors_N4.device
    matched = torch.full((B, N), -1, dtype=torch.long, device=device)
    if B == 0 or M == 0 or N == 0:
        return matched
    anchors = anchors_N4.float()
    gts = gt_boxes_BM4.to(device=device, dtype=torch.float32)
    valid = gt_valid_BM.to(device=device, dtype=torch.bool)

    a_ctr = _centres(anchors)  # (N, 2)
    g_ctr = _centres(gts)  # (B, M, 2)

    cand = []
    start = 0
    for n_l in num_anchors_per_level:
        n_l = int(n_l)
        if n_l > 0:
            d = _sq_dist(a_ctr[start : start + n_l], g_ctr[:, :, None, :])  # (B, M, N_l)
            cand.append(_nearest(d, min(topk, n_l)) + start)
        start += n_l
    cand = torch.cat(cand, dim=-1)  # (B, M, C) global anchor indices
    C = cand.shape[-1]

    ious = box_iou(anchors[cand], gts[:, :, None, :], plus_one)[..., 0]  # (B, M, C)
    std = ious.std(-1) if C > 1 else torch.zeros_like(ious[..., 0])  # a single candidate: std 0 (official: nan)
    thresh = ious.mean(-1) + std
    is_pos = ious >= thresh[..., None]

    c_ctr = a_ctr[cand]  # (B, M, C, 2)
    g = gts[:, :, None, :]
    ltrb = torch.stack(
        [c_ctr[..., 0] - g[..., 0], c_ctr[..., 1] - g[..., 1], g[..., 2] - c_ctr[..., 0], g[..., 3] - c_ctr[..., 1]],
        dim=-1,
    )
    is_pos &= ltrb.min(-1).values > INSIDE_EPS
    is_pos &= valid[:, :, None]

    # An anchor claimed by several GTs: highest IoU, then lowest GT index.
    flat_idx = cand.reshape(B, M * C)
    pos_iou = torch.where(is_pos, ious, torch.full_like(ious, -1.0)).reshape(B, M * C)
    best = torch.full((B, N), -1.0, device=device).scatter_reduce(1, flat_idx, pos_iou, "amax")
    is_best = is_pos.reshape(B, M * C) & (pos_iou == best.gather(1, flat_idx))
    gt_idx = torch.arange(M, device=device).view(1, M, 1).expand(B, M, C).reshape(B, M * C)
    winner = torch.full((B, N), M, dtype=torch.long, device=device).scatter_reduce(
        1, flat_idx, torch.where(is_best, gt_idx, torch.full_like(gt_idx, M)), "amin"
    )
    return torch.where(winner < M, winner, matched)


@torch.no_grad()
def atss_assign_reference(anchors_N4: Tensor, num_anchors_per_level: Sequence[int], gt_boxes_BM4: Tensor,
                          gt_valid_BM: Tensor, topk: int = 9, plus_one: bool = False) -> Tensor:
    """Slow per-image, per-GT version of :func:`atss_assign` (same result), close to the official loop."""
    B, M, N = _check(anchors_N4, num_anchors_per_level, gt_boxes_BM4, gt_valid_BM)
    anchors = anchors_N4.float()
    a_ctr = _centres(anchors)
    out = torch.full((B, N), -1, dtype=torch.long, device=anchors.device)
    starts = [0]
    for n_l in num_anchors_per_level:
        starts.append(starts[-1] + int(n_l))
    for b in range(B):
        gts = gt_boxes_BM4[b].to(device=anchors.device, dtype=torch.float32)
        if M == 0 or N == 0 or not bool(gt_valid_BM[b].any()):
            continue
        iou_NM = box_iou(anchors, gts, plus_one)  # (N, M)
        claimed = torch.full((N, M), -float("inf"), device=anchors.device)
        for m in range(M):
            if not bool(gt_valid_BM[b, m]):
                continue
            gt = gts[m]
            g_ctr = _centres(gt)
            cand = []
            for l in range(len(num_anchors_per_level)):
                s, e = starts[l], starts[l + 1]
                if e > s:
                    d = _sq_dist(a_ctr[s:e], g_ctr)
                    cand.append(_nearest(d, min(topk, e - s)) + s)
            cand = torch.cat(cand)
            ious = iou_NM[cand, m]
            std = ious.std() if ious.numel() > 1 else ious.new_zeros(())
            pos = ious >= ious.mean() + std
            c = a_ctr[cand]
            inside = torch.stack([c[:, 0] - gt[0], c[:, 1] - gt[1], gt[2] - c[:, 0], gt[3] - c[:, 1]], -1)
            pos &= inside.min(-1).values > INSIDE_EPS
            claimed[cand[pos], m] = ious[pos]
        value, index = claimed.max(dim=1)  # first maximal index on ties
        out[b] = torch.where(value > -float("inf"), index, torch.full_like(index, -1))
    return out
