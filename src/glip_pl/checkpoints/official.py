"""Released official GLIP checkpoints (microsoft/GLIP) ⇄ glip_pl files: read, rename with shape checks, export.

Official files are ``torch.save``d dicts with the weights under ``model`` (+ ``model_ema``, ``optimizer``,
``scheduler``, ``iteration`` when written by the trainer), every key prefixed ``module.`` (DDP). They are read
with ``torch.load(weights_only=True)`` only (``glip.safe_torch_load``). The name rules and the ignored buffers are
in ``official_names``; anything missing or unexpected beyond those is an error.

This module imports torch and ``glip_pl.model`` only (no Lightning).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..model.presets import PRESETS, GLIPConfig, get_config
from .glip import (FORMAT, CheckpointError, PresetLike, check_state_dict, check_tensors, glip_shapes, preset_config,
                   read_glip_checkpoint, safe_torch_load, write_glip_checkpoint)
from .official_names import (
    IGNORE_REASONS,
    glip_name_to_official,
    ignore_reason,
    official_cell_anchors,
    official_name_to_glip,
    relative_position_index,
)

log = logging.getLogger(__name__)

# Official DYHEAD.NUM_CLASSES default 81 → cls_logits has 80 output channels (reference §1.5.4, §8).
OFFICIAL_CLS_LOGITS_CLASSES = 80
OFFICIAL_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # cls_logits bias init (prior prob 0.01)


def _strip_module(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        name = k
        while name.startswith("module."):
            name = name[len("module."):]
        if name in out:
            raise CheckpointError(f"key {name!r} appears both with and without the 'module.' prefix")
        out[name] = v
    return out


def load_official_state_dict(path, use_ema: bool = False) -> dict:
    """{official name (no ``module.``): tensor} from an official GLIP checkpoint file.

    Accepts ``{"model": sd, ...}`` (the trainer's file; ``use_ema=True`` takes ``model_ema`` instead) or a bare
    state dict; ``module.`` prefixes are stripped. Loads with ``weights_only=True`` only.
    """
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        raise CheckpointError(f"{path}: this is already a glip_pl checkpoint (use load_glip_checkpoint)")
    wanted = "model_ema" if use_ema else "model"
    if wanted in obj and isinstance(obj[wanted], dict):
        sd = obj[wanted]
    elif use_ema:
        raise CheckpointError(
            f"{path}: --ema/use_ema asked for the EMA weights but the file has no 'model_ema' "
            f"(top-level keys: {sorted(map(str, obj))[:10]})"
        )
    elif obj and all(isinstance(v, Tensor) for v in obj.values()):
        sd = obj  # a bare state dict
    else:
        raise CheckpointError(
            f"{path}: no 'model' state dict and not a bare state dict (top-level keys: {sorted(map(str, obj))[:10]})"
        )
    if not sd:
        raise CheckpointError(f"{path}: the '{wanted}' state dict is empty")
    return check_tensors(_strip_module(dict(sd)), f"{path}['{wanted}']")


@dataclass
class ImportReport:
    """What happened to each official tensor. ``ok`` = nothing missing, unexpected or mismatched."""

    preset: str
    mapped: list = field(default_factory=list)  # (official name, glip_pl name)
    ignored: list = field(default_factory=list)  # (official name, reason key)
    missing: list = field(default_factory=list)  # glip_pl names with no official tensor
    unexpected: list = field(default_factory=list)  # official names no rule maps (or mapped to nothing)
    mismatched: list = field(default_factory=list)  # (official name, glip_pl name, official shape, our shape)
    invalid: list = field(default_factory=list)  # (official name, why) ignored buffers whose values differ

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.invalid)

    def summary(self, limit: int = 20) -> str:
        lines = [f"official → glip_pl ({self.preset}): {len(self.mapped)} mapped, {len(self.ignored)} ignored, "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.mismatched)} shape mismatches"]
        by_reason: dict = {}
        for name, reason in self.ignored:
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            lines.append(f"  ignored {len(names):4d} × {reason}: {IGNORE_REASONS[reason]}")

        def block(title, items):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {x}" for x in items[:limit])
                if len(items) > limit:
                    lines.append(f"    ... {len(items) - limit} more")

        block("MISSING (glip_pl tensors the checkpoint does not provide)", self.missing)
        block("UNEXPECTED (official tensors glip_pl has no place for)", self.unexpected)
        block("SHAPE MISMATCH (official, glip_pl, official shape, glip_pl shape)",
              [f"{a} -> {b}: {tuple(s)} vs {tuple(t)}" for a, b, s, t in self.mismatched])
        block("INVALID", [f"{a}: {why}" for a, why in self.invalid])
        return "\n".join(lines)

    __str__ = summary


def _preset_name(preset: PresetLike) -> str:
    return preset if isinstance(preset, str) else "custom"


# --------------------------------------------------------------------------------------------- import


def official_to_glip(official_sd: dict, preset: PresetLike, strict: bool = True) -> tuple:
    """(glip_pl state dict, ImportReport) from an official state dict (``module.`` prefixes allowed).

    Tensors are passed through untouched (same objects, same dtype); every name is renamed by the rules of
    ``official_names`` and its shape checked against the preset. ``strict`` (default): raise
    ``CheckpointError`` with the report if anything is missing, unexpected, mismatched or invalid.
    """
    cfg = preset_config(preset)
    expected = glip_shapes(cfg)
    sd = check_tensors(_strip_module(dict(official_sd)), "official state dict")
    report = ImportReport(preset=_preset_name(preset))
    out: dict = {}
    windows = _block_windows(cfg)
    anchors = official_cell_anchors(cfg)
    for name, t in sd.items():
        reason = ignore_reason(name)
        if reason is not None:
            report.ignored.append((name, reason))
            why = _check_ignored_value(name, reason, t, windows, anchors)
            if why:
                report.invalid.append((name, why))
            continue
        ours = official_name_to_glip(name, cfg)
        if ours is None or ours not in expected:
            report.unexpected.append(name)
            continue
        if tuple(t.shape) != expected[ours]:
            report.mismatched.append((name, ours, tuple(t.shape), expected[ours]))
            continue
        if ours in out:
            report.unexpected.append(name)  # two official names onto one of ours (cannot happen with these rules)
            continue
        out[ours] = t
        report.mapped.append((name, ours))
    seen = set(out) | {b for _, b, _, _ in report.mismatched}
    report.missing = [k for k in expected if k not in seen]
    if strict and not report.ok:
        raise CheckpointError(
            "the checkpoint does not match the glip_pl preset "
            f"{report.preset!r} (wrong --preset, or not a GLIP checkpoint?):\n{report.summary()}"
        )
    return out, report


def _block_windows(cfg: GLIPConfig) -> dict:
    ws = cfg.swin.window_size
    return {(i, j): ws for i, d in enumerate(cfg.swin.depths) for j in range(d)}


def _check_ignored_value(name: str, reason: str, t: Tensor, windows: dict, anchors: list) -> Optional[str]:
    """Why an ignored buffer disagrees with what glip_pl recomputes (None if it agrees / is not checked)."""
    if t.device.type == "meta":
        return None
    if reason == "relative_position_index":
        i, j = map(int, re.findall(r"\d+", name)[:2])
        if (i, j) not in windows:
            return "no such Swin block in this preset"
        ref = relative_position_index(windows[(i, j)])
        if tuple(t.shape) != tuple(ref.shape):
            return f"shape {tuple(t.shape)} but window {windows[(i, j)]} gives {tuple(ref.shape)}"
        if not torch.equal(t.to(torch.int64), ref):
            return "values differ from the index glip_pl (timm) computes for this window"
    elif reason == "cell_anchors":
        lvl = int(name.rsplit(".", 1)[1])
        if lvl >= len(anchors):
            return f"level {lvl} but the preset has {len(anchors)} levels"
        if tuple(t.shape) != (1, 4) or not torch.equal(t.to(torch.float32), anchors[lvl]):
            return f"{t.tolist()} but glip_pl's +1 anchors are {anchors[lvl].tolist()} (different sizes/strides?)"
    elif reason == "position_ids":
        if t.numel() and not torch.equal(t.reshape(-1).to(torch.int64), torch.arange(t.numel())):
            return "not arange(n): glip_pl (transformers) always uses positions 0..T-1"
    return None


# --------------------------------------------------------------------------------------------- export


def glip_to_official(glip_sd: dict, preset: PresetLike) -> dict:
    """Official (unprefixed) state dict from a glip_pl one, with the buffers the official model has.

    Every glip_pl tensor is passed through untouched under its official name; added: Swin
    ``relative_position_index`` buffers, ``rpn.anchor_generator.cell_anchors.{l}`` (+1 convention) and
    ``rpn.head.cls_logits`` (zeros weight, prior bias: the official head's unused 80-class conv), so the result
    has exactly the official key set. Raises if the glip_pl state dict does not match the preset.
    """
    cfg = preset_config(preset)
    check_state_dict(glip_sd, glip_shapes(cfg),
                     f"the glip_pl state dict does not match preset {_preset_name(preset)!r}")
    # Emitted in the official module order (the reference listings' order), buffers at their places.
    windows = _block_windows(cfg)
    items: list = []
    for k, t in glip_sd.items():
        name = glip_name_to_official(k, cfg)
        if name is None:
            raise CheckpointError(f"glip_pl tensor {k!r} has no official name")
        if name == "rpn.head.bbox_pred.weight":
            c = cfg.channels
            items.append(("rpn.head.cls_logits.weight", torch.zeros(OFFICIAL_CLS_LOGITS_CLASSES, c, 1, 1)))
            items.append(("rpn.head.cls_logits.bias", torch.full((OFFICIAL_CLS_LOGITS_CLASSES,), OFFICIAL_PRIOR_BIAS)))
        items.append((name, t))
        m = re.fullmatch(r"backbone\.body\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table", name)
        if m:
            ws = windows[(int(m[1]), int(m[2]))]
            items.append((name.replace("relative_position_bias_table", "relative_position_index"),
                          relative_position_index(ws)))
    # official head order: ..., centerness, dot_product_projection_text, scales
    proj = [kv for kv in items if kv[0].startswith("rpn.head.dot_product_projection_text.")]
    items = [kv for kv in items if not kv[0].startswith("rpn.head.dot_product_projection_text.")]
    first_scale = next((i for i, kv in enumerate(items) if kv[0].startswith("rpn.head.scales.")), len(items))
    items[first_scale:first_scale] = proj
    for lvl, a in enumerate(official_cell_anchors(cfg)):
        items.append((f"rpn.anchor_generator.cell_anchors.{lvl}", a))
    out = dict(items)
    if len(out) != len(items):
        raise CheckpointError("two glip_pl tensors map onto the same official name")
    return out


def import_official(src, out, preset: str, use_ema: bool = False) -> ImportReport:
    """Convert an official checkpoint file into a glip_pl checkpoint (``official_compat=True``); the report."""
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = get_config(preset, official_compat=True)
    official = load_official_state_dict(src, use_ema=use_ema)
    glip_sd, report = official_to_glip(official, preset)
    write_glip_checkpoint(out, preset, cfg, glip_sd,
                          source={"official_checkpoint": Path(src).name, "use_ema": bool(use_ema)})
    return report


def export_official(ckpt, out, preset: Optional[str] = None) -> dict:
    """Write a glip_pl checkpoint (or a Lightning one of the GLIP module) in the official layout:
    ``{"model": {"module." + official name: tensor}}``. Returns the written official state dict (unprefixed)."""
    cfg, _, sd = read_glip_checkpoint(ckpt, preset)
    if not cfg.official_compat:
        log.warning(
            "%s was built with official_compat=False (RGB input, continuous boxes, subsampled DCN offsets): "
            "the official code will load the weights but its outputs will differ from glip_pl's", ckpt,
        )
    official = glip_to_official(sd, cfg)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"module." + k: v for k, v in official.items()}}, out)
    return official


__all__ = [
    "ImportReport",
    "load_official_state_dict",
    "official_to_glip",
    "glip_to_official",
    "import_official",
    "export_official",
]
