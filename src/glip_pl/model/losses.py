"""GLIP grounding loss: ATSS assignment, token focal loss, centerness-weighted GIoU, centerness BCE (reference §2).

P = positive anchors of the whole batch. The terms are unweighted; ``GroundingCriterion.weights`` is the one place
the weights live. ``reduce_mean`` (an all-reduce average set by the training shell) is called exactly once per
forward on every rank, positives or not, so no rank waits on a collective another skipped.

Fixed shapes: every term is computed for all B*N anchors and masked with ``torch.where`` or a 0/1 weight, never by
boolean indexing, so the loss traces into one graph under ``torch.compile(fullgraph=True)`` with no host sync.
Masked-out inputs are replaced by safe values first (0 logits, the anchor as its own GT box), so they get zero
gradient and cannot turn a sum into NaN. ``criterion_reference`` is the indexed per-image form it is tested against.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .atss import atss_assign, atss_assign_reference
from .box_coder import BoxCoder
from .types import GLIPInputError, GroundingOutputs, Targets

DEFAULT_WEIGHTS = {"loss_token": 1.0, "loss_reg": 2.0, "loss_centerness": 1.0}  # §2.3-2.4


def _identity(t: Tensor) -> Tensor:
    return t


def centerness_targets(anchors_P4: Tensor, gt_P4: Tensor) -> Tensor:
    """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) of each anchor centre inside its GT box, (P,)."""
    cx = (anchors_P4[:, 0] + anchors_P4[:, 2]) / 2.0
    cy = (anchors_P4[:, 1] + anchors_P4[:, 3]) / 2.0
    l, t = cx - gt_P4[:, 0], cy - gt_P4[:, 1]
    r, b = gt_P4[:, 2] - cx, gt_P4[:, 3] - cy
    lr = torch.minimum(l, r) / torch.maximum(l, r)
    tb = torch.minimum(t, b) / torch.maximum(t, b)
    return torch.sqrt(lr * tb)


def ignored_tokens(anchors_N4: Tensor, ignore_boxes: Tensor, ignore_valid: Tensor, ignore_map: Tensor) -> Tensor:
    """(B, N, T) bool: the anchor's centre lies strictly inside a valid ignore box whose map marks token t."""
    ctr = (anchors_N4[:, :2] + anchors_N4[:, 2:]) / 2.0  # (N, 2)
    box = ignore_boxes[:, None, :, :]  # (B, 1, K, 4)
    cx, cy = ctr[None, :, None, 0], ctr[None, :, None, 1]
    inside = (cx > box[..., 0]) & (cx < box[..., 2]) & (cy > box[..., 1]) & (cy < box[..., 3])  # (B, N, K)
    inside &= ignore_valid[:, None, :].bool()
    return torch.bmm(inside.float(), ignore_map.float()) > 0


def _ignore_inputs(targets: Targets, B: int, T: int, device) -> Optional[tuple]:
    """Checked ignore regions padded to T tokens, or None. All-padding regions are not special-cased: they ignore
    nothing, and testing for them would be a host sync."""
    if targets.ignore_boxes is None and targets.ignore_map is None and targets.ignore_valid is None:
        return None
    if targets.ignore_boxes is None or targets.ignore_map is None or targets.ignore_valid is None:
        raise GLIPInputError("targets need all of ignore_boxes, ignore_valid and ignore_map, or none of them")
    boxes, valid, imap = targets.ignore_boxes.float(), targets.ignore_valid.bool(), targets.ignore_map.float()
    if boxes.dim() != 3 or boxes.shape[0] != B or boxes.shape[-1] != 4:
        raise GLIPInputError(f"targets.ignore_boxes must be (B={B}, K, 4), got {tuple(boxes.shape)}")
    K = boxes.shape[1]
    if tuple(valid.shape) != (B, K):
        raise GLIPInputError(f"targets.ignore_valid must be (B={B}, K={K}), got {tuple(valid.shape)}")
    if imap.dim() != 3 or imap.shape[:2] != (B, K) or imap.shape[-1] > T:
        raise GLIPInputError(f"targets.ignore_map must be (B={B}, K={K}, T<={T}), got {tuple(imap.shape)}")
    if K == 0:
        return None
    return boxes.to(device), valid.to(device), F.pad(imap, (0, T - imap.shape[-1])).to(device)


def _box_weights(targets: Targets, B: int, M: int) -> Tensor:
    if targets.box_weight is None:
        return torch.ones(B, M, device=targets.boxes.device)
    w = targets.box_weight.float()
    if tuple(w.shape) != (B, M):
        raise GLIPInputError(f"targets.box_weight must be (B={B}, M={M}), got {tuple(w.shape)}")
    ok_msg = "targets.box_weight must be finite and >= 0"
    if torch.compiler.is_compiling():  # a device-side check: a Python `if` on a tensor would break the graph
        torch._assert_async(torch.isfinite(w).all() & (w >= 0).all(), ok_msg)
    elif not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise GLIPInputError(ok_msg)
    return w.to(targets.boxes.device)


def _flatten_inverted(pred_4: Tensor) -> Tensor:
    """A decoded box with x2 < x1 (or y2 < y1) flattened to zero width (height), as the official loss does."""
    x1, y1, x2, y2 = pred_4.unbind(-1)
    return torch.stack([x1, y1, torch.maximum(x1, x2), torch.maximum(y1, y2)], dim=-1)


def _giou_loss(pred_4: Tensor, gt_4: Tensor, eps: float = 1e-7) -> Tensor:
    """``torchvision.ops.generalized_box_iou_loss``'s arithmetic with ``torch.where`` where torchvision indexes by a
    boolean mask (a data-dependent shape under compile)."""
    pred = _flatten_inverted(pred_4)
    x1, y1, x2, y2 = pred.unbind(-1)
    x1g, y1g, x2g, y2g = gt_4.unbind(-1)
    xk1, yk1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xk2, yk2 = torch.min(x2, x2g), torch.min(y2, y2g)
    overlap = (yk2 > yk1) & (xk2 > xk1)
    inter = torch.where(overlap, (xk2 - xk1) * (yk2 - yk1), torch.zeros_like(x1))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    area_c = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iou - (area_c - union) / (area_c + eps))


def _giou_loss_torchvision(pred_P4: Tensor, gt_P4: Tensor) -> Tensor:
    return torchvision.ops.generalized_box_iou_loss(_flatten_inverted(pred_P4), gt_P4, reduction="none")


class GroundingCriterion(nn.Module):
    """ATSS-assigned GLIP losses; ``forward`` -> {"loss_token", "loss_reg", "loss_centerness"} (unweighted)."""

    def __init__(
        self,
        box_coder: BoxCoder,
        topk: int = 9,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        weights: Optional[dict] = None,
        plus_one: bool = False,
    ):
        super().__init__()
        if bool(plus_one) != box_coder.plus_one:
            raise GLIPInputError(
                f"GroundingCriterion(plus_one={plus_one}) disagrees with box_coder.plus_one={box_coder.plus_one}"
            )
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise GLIPInputError(f"unknown loss weights {sorted(unknown)}; terms are {sorted(DEFAULT_WEIGHTS)}")
        self.box_coder = box_coder
        self.topk = int(topk)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.plus_one = bool(plus_one)
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.reduce_mean: Callable[[Tensor], Tensor] = _identity

    def total(self, terms: dict) -> Tensor:
        unknown = set(terms) - set(self.weights)
        if unknown:
            raise GLIPInputError(f"no weight for loss terms {sorted(unknown)}")
        return sum(self.weights[k] * v for k, v in terms.items())

    def _prepare(self, outputs: GroundingOutputs, targets: Targets):
        """fp32 copies of the inputs, shapes checked."""
        logits = outputs.logits.float()
        if logits.dim() != 3:
            raise GLIPInputError(f"outputs.logits must be (B, N, T), got {tuple(logits.shape)}")
        B, N, T = logits.shape
        deltas = outputs.box_regression.float()
        ctr = outputs.centerness.float()
        anchors = outputs.anchors.float()
        if tuple(deltas.shape) != (B, N, 4):
            raise GLIPInputError(f"outputs.box_regression must be {(B, N, 4)}, got {tuple(deltas.shape)}")
        if tuple(ctr.shape) != (B, N):
            raise GLIPInputError(f"outputs.centerness must be {(B, N)}, got {tuple(ctr.shape)}")
        if tuple(anchors.shape) != (N, 4):
            raise GLIPInputError(f"outputs.anchors must be {(N, 4)}, got {tuple(anchors.shape)}")
        if sum(outputs.num_anchors_per_level) != N:
            raise GLIPInputError(f"outputs.level_sizes {outputs.level_sizes} do not cover the N={N} anchors")
        boxes = targets.boxes.float()
        if boxes.dim() != 3 or boxes.shape[0] != B or boxes.shape[-1] != 4:
            raise GLIPInputError(f"targets.boxes must be (B={B}, M, 4), got {tuple(boxes.shape)}")
        M = boxes.shape[1]
        valid = targets.valid.bool()
        pmap = targets.positive_map.float()
        if pmap.dim() != 3 or pmap.shape[:2] != (B, M):
            raise GLIPInputError(f"targets.positive_map must be (B={B}, M={M}, T), got {tuple(pmap.shape)}")
        if pmap.shape[-1] > T:
            raise GLIPInputError(f"targets.positive_map has {pmap.shape[-1]} tokens but the logits only {T}")
        pmap = F.pad(pmap, (0, T - pmap.shape[-1]))
        mask = outputs.text_mask
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=logits.device)
        elif tuple(mask.shape) != (B, T):
            raise GLIPInputError(f"outputs.text_mask must be (B={B}, T={T}), got {tuple(mask.shape)}")
        ignore = _ignore_inputs(targets, B, T, logits.device)
        return logits, deltas, ctr, anchors, boxes, valid, pmap, mask.bool(), ignore, _box_weights(targets, B, M)

    def _normalisers(self, num_pos: Tensor, ctr_sum: Tensor, weight_sum: Tensor, reduce_mean) -> tuple:
        """(positives, weighted centerness target sum, box-weight sum) averaged over ranks in one collective."""
        stats = reduce_mean(torch.stack([num_pos.detach().float(), ctr_sum.detach().float(),
                                         weight_sum.detach().float()]))
        return stats[0].clamp(min=1.0), stats[1].clamp(min=1e-6), stats[2].clamp(min=1e-6)

    def forward(
        self, outputs: GroundingOutputs, targets: Targets, reduce_mean: Optional[Callable[[Tensor], Tensor]] = None
    ) -> dict:
        reduce_mean = reduce_mean or self.reduce_mean or _identity
        with torch.autocast(device_type=outputs.logits.device.type, enabled=False):
            logits, deltas, ctr, anchors, boxes, valid, pmap, mask, ignore, bw = self._prepare(outputs, targets)
            B, N, T = logits.shape
            matched = atss_assign(anchors, outputs.num_anchors_per_level, boxes, valid, self.topk, self.plus_one)
            pos = matched >= 0  # (B, N)

            if pmap.shape[1] > 0:
                idx = matched.clamp(min=0)[:, :, None].expand(B, N, T)
                token_tgt = torch.gather(pmap, 1, idx) * pos[:, :, None]
            else:
                token_tgt = torch.zeros_like(logits)
            sel = mask[:, None, :].expand(B, N, T)
            if ignore is not None:  # no negative loss inside ignore regions (positive targets still train)
                sel = sel & ~(ignored_tokens(anchors, *ignore) & (token_tgt == 0))
            focal = torchvision.ops.sigmoid_focal_loss(
                torch.where(sel, logits, torch.zeros_like(logits)), token_tgt, alpha=self.focal_alpha,
                gamma=self.focal_gamma, reduction="none",
            )
            token_sum = torch.where(sel, focal, torch.zeros_like(focal)).sum()

            # Normalised by the weighted sums, so a weight-0 box neither trains nor dilutes these terms.
            if boxes.shape[1] == 0:  # no GT column to gather from (every anchor is background anyway)
                boxes, bw = boxes.new_zeros(B, 1, 4), bw.new_zeros(B, 1)
            anc = anchors[None].expand(B, N, 4)
            m_idx = matched.clamp(min=0)
            gt = torch.where(pos[..., None], torch.gather(boxes, 1, m_idx[..., None].expand(B, N, 4)), anc)
            w = torch.gather(bw, 1, m_idx) * pos  # (B, N), 0 off the positives
            ctr_tgt = torch.where(pos, centerness_targets(anc.reshape(-1, 4), gt.reshape(-1, 4)).view(B, N),
                                  torch.zeros_like(w))
            num_pos_avg, ctr_avg, w_avg = self._normalisers(pos.sum(), (w * ctr_tgt).sum(), w.sum(), reduce_mean)

            pred = self.box_coder.decode(torch.where(pos[..., None], deltas, torch.zeros_like(deltas)), anc)
            reg_sum = (_giou_loss(pred, gt) * ctr_tgt * w).sum()
            ctr_bce = F.binary_cross_entropy_with_logits(
                torch.where(pos, ctr, torch.zeros_like(ctr)), ctr_tgt, reduction="none")
            ctr_loss_sum = (ctr_bce * w).sum()
        return {
            "loss_token": token_sum / num_pos_avg,
            "loss_reg": reg_sum / ctr_avg,
            "loss_centerness": ctr_loss_sum / w_avg,
        }


def criterion_reference(
    criterion: GroundingCriterion,
    outputs: GroundingOutputs,
    targets: Targets,
    reduce_mean: Optional[Callable[[Tensor], Tensor]] = None,
) -> dict:
    """Slow per-image version of ``criterion(outputs, targets)`` (atss_assign_reference, one image at a time)."""
    reduce_mean = reduce_mean or criterion.reduce_mean or _identity
    logits, deltas, ctr, anchors, boxes, valid, pmap, mask, ignore, bw = criterion._prepare(outputs, targets)
    B, N, T = logits.shape
    token_sum = logits.sum() * 0.0
    reg_sum = deltas.sum() * 0.0
    ctr_loss_sum = ctr.sum() * 0.0
    num_pos = 0
    ctr_tgt_sum = torch.zeros((), device=logits.device)
    weight_sum = torch.zeros((), device=logits.device)
    for b in range(B):
        matched = atss_assign_reference(
            anchors, outputs.num_anchors_per_level, boxes[b : b + 1], valid[b : b + 1], criterion.topk,
            criterion.plus_one,
        )[0]
        pos = matched >= 0
        tgt = torch.zeros(N, T, device=logits.device)
        tgt[pos] = pmap[b, matched[pos]]
        keep = mask[b][None, :].expand(N, T).clone()
        if ignore is not None:
            i_boxes, i_valid, i_map = ignore
            for k in range(i_boxes.shape[1]):
                if not bool(i_valid[b, k]):
                    continue
                x1, y1, x2, y2 = i_boxes[b, k].tolist()
                for n in range(N):
                    cx = float(anchors[n, 0] + anchors[n, 2]) / 2.0
                    cy = float(anchors[n, 1] + anchors[n, 3]) / 2.0
                    if x1 < cx < x2 and y1 < cy < y2:
                        keep[n] &= ~((i_map[b, k] > 0) & (tgt[n] == 0))
        token_sum = token_sum + torchvision.ops.sigmoid_focal_loss(
            logits[b][keep], tgt[keep], criterion.focal_alpha, criterion.focal_gamma, reduction="sum"
        )
        if not bool(pos.any()):
            continue
        gt = boxes[b, matched[pos]]
        wt = bw[b, matched[pos]]
        anc = anchors[pos]
        ct = centerness_targets(anc, gt)
        pred = criterion.box_coder.decode(deltas[b][pos], anc)
        reg_sum = reg_sum + (wt * _giou_loss_torchvision(pred, gt) * ct).sum()
        ctr_loss_sum = ctr_loss_sum + (wt * F.binary_cross_entropy_with_logits(ctr[b][pos], ct, reduction="none")).sum()
        num_pos += int(pos.sum())
        ctr_tgt_sum = ctr_tgt_sum + (wt * ct).sum()
        weight_sum = weight_sum + wt.sum()
    num_pos_t = torch.tensor(float(num_pos), device=logits.device)
    num_pos_avg, ctr_avg, w_avg = criterion._normalisers(num_pos_t, ctr_tgt_sum, weight_sum, reduce_mean)
    return {
        "loss_token": token_sum / num_pos_avg,
        "loss_reg": reg_sum / ctr_avg,
        "loss_centerness": ctr_loss_sum / w_avg,
    }
