"""Head outputs -> per-image phrase detections, as the official ATSS post-processor (reference §6).

Steps: phrase score = mean sigmoid over the phrase's tokens; candidates have phrase score > ``score_thresh``
(before centerness); top ``pre_nms_top_n`` (anchor, phrase) pairs per level and image ranked by the final score
sqrt(phrase score * sigmoid(centerness)); decode; clip to the content size of the network input; NMS per phrase;
top ``detections_per_img``; rescale to the original image size. NMS runs in network-input pixels before the
rescaling, as the official (identical for the continuous IoU, and exact for the +1 IoU).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .box_coder import BoxCoder, nms
from .types import Detections, GLIPInputError, GroundingOutputs


def _phrase_maps(token_maps: Sequence[Tensor], B: int, T: int, device) -> tuple[Tensor, Tensor]:
    """Token maps padded to (B, P_max, T) and the (B, P_max) mask of real phrases."""
    if len(token_maps) != B:
        raise GLIPInputError(f"{len(token_maps)} token maps for a batch of {B} images")
    p_max = max((int(m.shape[0]) for m in token_maps), default=0)
    maps = torch.zeros(B, p_max, T, device=device)
    real = torch.zeros(B, p_max, dtype=torch.bool, device=device)
    for b, m in enumerate(token_maps):
        if m.dim() != 2:
            raise GLIPInputError(f"token_maps[{b}] must be (P, T), got {tuple(m.shape)}")
        m = m.to(device=device, dtype=torch.float32)
        if m.shape[1] > T:
            if bool(m[:, T:].any()):
                raise GLIPInputError(f"token_maps[{b}] points at tokens beyond the T={T} tokens of the logits")
            m = m[:, :T]
        if m.shape[0] and bool((m.sum(-1) <= 0).any()):
            empty = (m.sum(-1) <= 0).nonzero().flatten().tolist()
            raise GLIPInputError(f"token_maps[{b}]: phrases {empty} cover no token")
        maps[b, : m.shape[0], : m.shape[1]] = m
        real[b, : m.shape[0]] = True
    return maps, real


@torch.no_grad()
def postprocess(
    outputs: GroundingOutputs,
    token_maps: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    orig_sizes: Sequence[tuple[int, int]],
    box_coder: BoxCoder,
    score_thresh: float = 0.05,
    pre_nms_top_n: int = 1000,
    nms_thresh: float = 0.6,
    detections_per_img: int = 100,
    plus_one: bool = False,
    phrases: Optional[Sequence[Sequence[str]]] = None,
) -> list:
    """One :class:`Detections` per image (boxes in original pixels, labels = 0-based phrase index), fp32."""
    if bool(plus_one) != box_coder.plus_one:
        raise GLIPInputError(f"postprocess(plus_one={plus_one}) disagrees with box_coder.plus_one={box_coder.plus_one}")
    logits = outputs.logits.float()
    B, N, T = logits.shape
    device = logits.device
    for name, seq in (("image_sizes", image_sizes), ("orig_sizes", orig_sizes)):
        if len(seq) != B:
            raise GLIPInputError(f"{len(seq)} {name} for a batch of {B} images")
    if phrases is not None and len(phrases) != B:
        raise GLIPInputError(f"{len(phrases)} phrase lists for a batch of {B} images")
    if sum(outputs.num_anchors_per_level) != N:
        raise GLIPInputError(f"outputs.level_sizes {outputs.level_sizes} do not cover the N={N} anchors")

    maps, real = _phrase_maps(token_maps, B, T, device)  # (B, P, T), (B, P)
    P = maps.shape[1]
    # Mean token probability per phrase: (B, N, T) @ (B, T, P) / tokens per phrase.
    phrase_score = torch.bmm(logits.sigmoid(), maps.transpose(1, 2)) / maps.sum(-1).clamp(min=1.0)[:, None, :]
    cand = (phrase_score > score_thresh) & real[:, None, :]  # (B, N, P), threshold before centerness
    final = phrase_score * outputs.centerness.float().sigmoid()[:, :, None]  # ranking key, sqrt taken later
    key = torch.where(cand, final, torch.full_like(final, -1.0))

    sel_b, sel_n, sel_p, sel_s = [], [], [], []
    start = 0
    for n_l in outputs.num_anchors_per_level:
        key_l = key[:, start : start + n_l].reshape(B, n_l * P)
        k = min(int(pre_nms_top_n), n_l * P)
        if k > 0:
            top, idx = key_l.topk(k, dim=1)  # (B, k)
            ok = top >= 0  # a real candidate (non-candidates carry -1)
            b = torch.arange(B, device=device)[:, None].expand(B, k)
            sel_b.append(b[ok])
            sel_n.append(start + idx[ok] // P)
            sel_p.append(idx[ok] % P)
            sel_s.append(top[ok])
        start += n_l
    empty = torch.zeros(0, dtype=torch.long, device=device)
    sel_b = torch.cat(sel_b) if sel_b else empty
    sel_n = torch.cat(sel_n) if sel_n else empty
    sel_p = torch.cat(sel_p) if sel_p else empty
    scores = torch.cat(sel_s).sqrt() if sel_s else torch.zeros(0, device=device)

    boxes = box_coder.decode(outputs.box_regression.float()[sel_b, sel_n], outputs.anchors.float()[sel_n])
    hw = torch.as_tensor([tuple(s) for s in image_sizes], dtype=torch.float32, device=device).reshape(B, 2)
    limit = hw[sel_b] - (1.0 if plus_one else 0.0)  # official clip_to_image: [0, w-1] under +1
    limit = torch.stack([limit[:, 1], limit[:, 0], limit[:, 1], limit[:, 0]], dim=-1)
    boxes = torch.minimum(boxes.clamp(min=0.0), limit)

    # Per-image, per-phrase NMS in one call (label = image * P + phrase), sorted by decreasing score.
    keep = nms(boxes, scores, sel_b * max(P, 1) + sel_p, nms_thresh, plus_one)
    kb = sel_b[keep]
    order = keep[torch.sort(kb, stable=True).indices]  # grouped by image, by score within an image
    per_img = torch.bincount(kb, minlength=B)
    if detections_per_img > 0:
        first = torch.cumsum(per_img, 0) - per_img
        rank = torch.arange(order.numel(), device=device) - first[sel_b[order]]
        order = order[rank < detections_per_img]
        per_img = per_img.clamp(max=detections_per_img)

    orig = torch.as_tensor([tuple(s) for s in orig_sizes], dtype=torch.float32, device=device).reshape(B, 2)
    ratio = orig / hw  # (B, 2) h, w
    ratio = torch.stack([ratio[:, 1], ratio[:, 0], ratio[:, 1], ratio[:, 0]], dim=-1)
    out_boxes = boxes[order] * ratio[sel_b[order]]
    counts = per_img.tolist()
    parts = zip(out_boxes.split(counts), scores[order].split(counts), sel_p[order].split(counts))
    return [
        Detections(boxes=bx, scores=sc, labels=lb, phrases=list(phrases[b]) if phrases is not None else [])
        for b, (bx, sc, lb) in enumerate(parts)
    ]
