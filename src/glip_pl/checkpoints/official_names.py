"""The official GLIP (microsoft/GLIP) state-dict names ⇄ glip_pl's, and the official buffers glip_pl recomputes
instead of loading (``IGNORE_REASONS``; checked equal on import, re-created on export). The rules as a table, with
their reasons: ``docs/official_compat.md`` (reference §8).
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor

from ..model.presets import GLIPConfig
from .glip import PresetLike, preset_config


def _towers_official_index(cfg: GLIPConfig):
    """Map official tower index → glip_pl tower index (identity with deep fusion; 3k+2 for T(A))."""
    if cfg.fusion == "none":
        return (lambda n: 3 * n + 2), (lambda m: (m - 2) // 3 if m % 3 == 2 else None)
    return (lambda n: n), (lambda m: m)


def relative_position_index(window: int) -> Tensor:
    """The Swin relative-position index (window²,window²) int64, as timm (and the official Swin) compute it."""
    from timm.models.swin_transformer import get_relative_position_index

    return get_relative_position_index(window, window).to(torch.int64)


def official_cell_anchors(cfg: GLIPConfig) -> list:
    """Official ``rpn.anchor_generator.cell_anchors.{l}``: (1,4) float32 per level, +1 (TO_REMOVE) convention."""
    from ..model.anchors import _cell_anchor

    return [torch.tensor([_cell_anchor(s, cfg.anchor_scale * s, plus_one=True)], dtype=torch.float32)
            for s in cfg.strides]


# --------------------------------------------------------------------------------------------- names

IGNORE_REASONS = {
    "relative_position_index": "Swin buffer recomputed by timm from the window size (checked equal)",
    "attn_mask": "Swin shift-window mask, recomputed for each input size",
    "position_ids": "BERT position_ids buffer of older transformers (arange; recomputed)",
    "pooler": "BERT pooler: GLIP builds BERT without it (add_pooling_layer=False)",
    "cls_logits": "frozen, unused 80-class conv of the official head (left out of glip_pl)",
    "cell_anchors": "anchors recomputed from strides and sizes with the +1 convention (checked equal)",
}


def ignore_reason(name: str) -> Optional[str]:
    if re.fullmatch(r"backbone\.body\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index", name):
        return "relative_position_index"
    if re.fullmatch(r"backbone\.body\.layers\.\d+\.blocks\.\d+\.attn_mask", name):
        return "attn_mask"
    if name == "language_backbone.body.model.embeddings.position_ids":
        return "position_ids"
    if name.startswith("language_backbone.body.model.pooler."):
        return "pooler"
    if name.startswith("rpn.head.cls_logits."):
        return "cls_logits"
    if re.fullmatch(r"rpn\.anchor_generator\.cell_anchors\.\d+", name):
        return "cell_anchors"
    return None


_FPN_OFF = {"fpn_inner": "inner_blocks", "fpn_layer": "layer_blocks"}
_FPN_OURS = {v: k for k, v in _FPN_OFF.items()}


def official_name_to_glip(name: str, preset: PresetLike) -> Optional[str]:
    """The glip_pl name of an official (``module.``-stripped) key; None if no rule applies."""
    cfg = preset_config(preset)
    to_ours, _ = _towers_official_index(cfg)
    m = re.fullmatch(r"backbone\.body\.(patch_embed\..+)", name)
    if m:
        return f"backbone.body.swin.{m[1]}"
    m = re.fullmatch(r"backbone\.body\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", name)
    if m:
        return f"backbone.body.swin.layers_{m[1]}.blocks.{m[2]}.{m[3]}"
    m = re.fullmatch(r"backbone\.body\.layers\.(\d+)\.downsample\.(.+)", name)
    if m:
        return f"backbone.body.swin.layers_{int(m[1]) + 1}.downsample.{m[2]}"
    m = re.fullmatch(r"backbone\.body\.(norm[123]\..+)", name)
    if m:
        return f"backbone.body.{m[1]}"
    m = re.fullmatch(r"backbone\.fpn\.(fpn_inner|fpn_layer)([234])\.(.+)", name)
    if m:
        return f"backbone.fpn.{_FPN_OFF[m[1]]}.{int(m[2]) - 2}.0.{m[3]}"
    m = re.fullmatch(r"backbone\.fpn\.top_blocks\.(p[67]\..+)", name)
    if m:
        return f"backbone.fpn.extra_blocks.{m[1]}"
    m = re.fullmatch(r"language_backbone\.body\.model\.(.+)", name)
    if m:
        return f"language_backbone.model.{m[1]}"
    m = re.fullmatch(r"rpn\.head\.dyhead_tower\.(\d+)\.(.+)", name)
    if m:
        return f"head.dyhead_tower.{to_ours(int(m[1]))}.{m[2]}"
    m = re.fullmatch(r"rpn\.head\.(.+)", name)
    if m:
        return f"head.{m[1]}"
    return None


def glip_name_to_official(name: str, preset: PresetLike) -> Optional[str]:
    """The official name of a glip_pl state-dict key (inverse of ``official_name_to_glip``); None if none."""
    cfg = preset_config(preset)
    _, to_off = _towers_official_index(cfg)
    m = re.fullmatch(r"backbone\.body\.swin\.(patch_embed\..+)", name)
    if m:
        return f"backbone.body.{m[1]}"
    m = re.fullmatch(r"backbone\.body\.swin\.layers_(\d+)\.blocks\.(\d+)\.(.+)", name)
    if m:
        return f"backbone.body.layers.{m[1]}.blocks.{m[2]}.{m[3]}"
    m = re.fullmatch(r"backbone\.body\.swin\.layers_(\d+)\.downsample\.(.+)", name)
    if m and int(m[1]) >= 1:
        return f"backbone.body.layers.{int(m[1]) - 1}.downsample.{m[2]}"
    m = re.fullmatch(r"backbone\.body\.(norm[123]\..+)", name)
    if m:
        return f"backbone.body.{m[1]}"
    m = re.fullmatch(r"backbone\.fpn\.(inner_blocks|layer_blocks)\.([012])\.0\.(.+)", name)
    if m:
        return f"backbone.fpn.{_FPN_OURS[m[1]]}{int(m[2]) + 2}.{m[3]}"
    m = re.fullmatch(r"backbone\.fpn\.extra_blocks\.(p[67]\..+)", name)
    if m:
        return f"backbone.fpn.top_blocks.{m[1]}"
    m = re.fullmatch(r"language_backbone\.model\.(.+)", name)
    if m:
        return f"language_backbone.body.model.{m[1]}"
    m = re.fullmatch(r"head\.dyhead_tower\.(\d+)\.(.+)", name)
    if m:
        n = to_off(int(m[1]))
        return None if n is None else f"rpn.head.dyhead_tower.{n}.{m[2]}"
    m = re.fullmatch(r"head\.(.+)", name)
    if m:
        return f"rpn.head.{m[1]}"
    return None


__all__ = ["IGNORE_REASONS", "official_name_to_glip", "glip_name_to_official", "ignore_reason",
           "relative_position_index", "official_cell_anchors"]
