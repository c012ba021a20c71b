"""Released official GLIP checkpoints (microsoft/GLIP) ⇄ glip_pl: load, rename with shape checks, export back.

Official files are ``torch.save``d dicts with the weights under ``model`` (+ ``model_ema``, ``optimizer``,
``scheduler``, ``iteration`` when written by the trainer), every key prefixed ``module.`` (DDP). They are read
with ``torch.load(weights_only=True)`` only: a file that needs more than tensors and plain containers is
refused (``OfficialCheckpointError``), never unpickled.

Naming rules (official, ``module.`` stripped → glip_pl; reference §8, ``docs/official_compat.md``):

====================================================  ==================================================
official                                              glip_pl
====================================================  ==================================================
backbone.body.patch_embed.*                           backbone.body.swin.patch_embed.*
backbone.body.layers.{i}.blocks.{j}.*                 backbone.body.swin.layers_{i}.blocks.{j}.*
backbone.body.layers.{i}.downsample.*  (i = 0..2)     backbone.body.swin.layers_{i+1}.downsample.*
backbone.body.norm{1,2,3}.*                           backbone.body.norm{1,2,3}.*
backbone.fpn.fpn_inner{2,3,4}.*                       backbone.fpn.inner_blocks.{0,1,2}.0.*
backbone.fpn.fpn_layer{2,3,4}.*                       backbone.fpn.layer_blocks.{0,1,2}.0.*
backbone.fpn.top_blocks.p{6,7}.*                      backbone.fpn.extra_blocks.p{6,7}.*
language_backbone.body.model.*                        language_backbone.model.*
rpn.head.dyhead_tower.{n}.*   (deep fusion: T, L)     head.dyhead_tower.{n}.*
rpn.head.dyhead_tower.{k}.*   (no fusion: T(A))       head.dyhead_tower.{3k+2}.*
rpn.head.*  (other)                                   head.*
====================================================  ==================================================

Ignored on import, each with its reason (and re-created on export where the official model has them):
``attn.relative_position_index`` (Swin buffer, recomputed by timm from the window size; checked equal),
``attn_mask`` (shift masks, recomputed per input size), ``embeddings.position_ids`` (arange buffer of older
transformers), ``pooler.*`` (BERT pooler, unused by GLIP), ``rpn.head.cls_logits.*`` (the frozen, unused
80-class conv; exported as zeros with the prior bias), ``rpn.anchor_generator.cell_anchors.*`` (recomputed from
strides/sizes with the +1 convention; checked equal). Anything else missing or unexpected is an error.

This module imports torch and ``glip_pl.model`` only (no Lightning).
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from .model.presets import PRESETS, GLIPConfig, get_config
from .model.types import GLIPInputError

log = logging.getLogger(__name__)

FORMAT = "glip_pl"
FORMAT_VERSION = 1
# Official DYHEAD.NUM_CLASSES default 81 → cls_logits has 80 output channels (reference §1.5.4, §8).
OFFICIAL_CLS_LOGITS_CLASSES = 80
OFFICIAL_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # cls_logits bias init (prior prob 0.01)

PresetLike = Union[str, GLIPConfig]


class OfficialCheckpointError(GLIPInputError):
    """An official (or glip_pl) checkpoint that cannot be converted: unsafe, incomplete, or for another model."""


# --------------------------------------------------------------------------------------------- loading


def _safe_torch_load(path) -> object:
    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OfficialCheckpointError(
            f"{path}: refused — this file needs more than plain tensors and containers to load (it pickles "
            f"Python objects), and glip_pl refuses to unpickle arbitrary objects because unpickling can run "
            f"code (torch.load(weights_only=True) said: {first}). If you trust the file, re-save just its "
            "weights in a trusted environment, e.g. torch.save({'model': ckpt['model']}, 'clean.pth'), and "
            "import that."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OfficialCheckpointError(f"{path}: cannot be read as a torch checkpoint ({first})") from None


def _strip_module(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        name = k
        while name.startswith("module."):
            name = name[len("module."):]
        if name in out:
            raise OfficialCheckpointError(f"key {name!r} appears both with and without the 'module.' prefix")
        out[name] = v
    return out


def _check_tensors(sd: dict, where: str) -> dict:
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        more = " ..." if len(bad) > 5 else ""
        raise OfficialCheckpointError(f"{where}: entries that are not tensors: {bad[:5]}{more}")
    return sd


def load_official_state_dict(path, use_ema: bool = False) -> dict:
    """{official name (no ``module.``): tensor} from an official GLIP checkpoint file.

    Accepts ``{"model": sd, ...}`` (the trainer's file; ``use_ema=True`` takes ``model_ema`` instead) or a bare
    state dict; ``module.`` prefixes are stripped. Loads with ``weights_only=True`` only.
    """
    obj = _safe_torch_load(path)
    if not isinstance(obj, dict):
        raise OfficialCheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        raise OfficialCheckpointError(f"{path}: this is already a glip_pl checkpoint (use load_glip_checkpoint)")
    wanted = "model_ema" if use_ema else "model"
    if wanted in obj and isinstance(obj[wanted], dict):
        sd = obj[wanted]
    elif use_ema:
        raise OfficialCheckpointError(
            f"{path}: --ema/use_ema asked for the EMA weights but the file has no 'model_ema' "
            f"(top-level keys: {sorted(map(str, obj))[:10]})"
        )
    elif obj and all(isinstance(v, Tensor) for v in obj.values()):
        sd = obj  # a bare state dict
    else:
        raise OfficialCheckpointError(
            f"{path}: no 'model' state dict and not a bare state dict (top-level keys: {sorted(map(str, obj))[:10]})"
        )
    if not sd:
        raise OfficialCheckpointError(f"{path}: the '{wanted}' state dict is empty")
    return _check_tensors(_strip_module(dict(sd)), f"{path}['{wanted}']")


# --------------------------------------------------------------------------------------------- presets


def _config(preset: PresetLike) -> GLIPConfig:
    if isinstance(preset, GLIPConfig):
        return preset
    if preset not in PRESETS:
        raise OfficialCheckpointError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return get_config(preset, official_compat=True)


def _shape_key(cfg: GLIPConfig) -> tuple:
    """Cache key of ``glip_shapes``: the whole config but the weight paths (which never change names/shapes)."""
    d = asdict(cfg)
    for sub in ("swin", "text"):
        d[sub].pop("pretrained", None)
    return repr(sorted(d.items()))


_SHAPES_CACHE: dict = {}


def glip_shapes(preset: PresetLike) -> dict:
    """{glip_pl state-dict name: shape} of a preset, from a model built on the meta device (no memory)."""
    from .model.glip import GLIP

    cfg = _without_pretrained(_config(preset))
    key = _shape_key(cfg)
    if key not in _SHAPES_CACHE:
        with torch.device("meta"):
            model = GLIP(cfg)
        _SHAPES_CACHE[key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return dict(_SHAPES_CACHE[key])


def _without_pretrained(cfg: GLIPConfig) -> GLIPConfig:
    return replace(cfg, swin=replace(cfg.swin, pretrained=None), text=replace(cfg.text, pretrained=None))


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
    from .model.anchors import _cell_anchor

    return [torch.tensor([_cell_anchor(s, cfg.anchor_scale * s, plus_one=True)], dtype=torch.float32)
            for s in cfg.strides]


# --------------------------------------------------------------------------------------------- names

_IGNORE_REASONS = {
    "relative_position_index": "Swin buffer recomputed by timm from the window size (checked equal)",
    "attn_mask": "Swin shift-window mask, recomputed for each input size",
    "position_ids": "BERT position_ids buffer of older transformers (arange; recomputed)",
    "pooler": "BERT pooler: GLIP builds BERT without it (add_pooling_layer=False)",
    "cls_logits": "frozen, unused 80-class conv of the official head (left out of glip_pl)",
    "cell_anchors": "anchors recomputed from strides and sizes with the +1 convention (checked equal)",
}


def _ignore_reason(name: str) -> Optional[str]:
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
    cfg = _config(preset)
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
    cfg = _config(preset)
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


# --------------------------------------------------------------------------------------------- report


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
            lines.append(f"  ignored {len(names):4d} × {reason}: {_IGNORE_REASONS[reason]}")

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

    Tensors are passed through untouched (same objects, same dtype); every name is renamed by the rules in the
    module docstring and its shape checked against the preset. ``strict`` (default): raise
    ``OfficialCheckpointError`` with the report if anything is missing, unexpected, mismatched or invalid.
    """
    cfg = _config(preset)
    expected = glip_shapes(cfg)
    sd = _check_tensors(_strip_module(dict(official_sd)), "official state dict")
    report = ImportReport(preset=_preset_name(preset))
    out: dict = {}
    windows = _block_windows(cfg)
    anchors = official_cell_anchors(cfg)
    for name, t in sd.items():
        reason = _ignore_reason(name)
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
        raise OfficialCheckpointError(
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
    cfg = _config(preset)
    expected = glip_shapes(cfg)
    missing = [k for k in expected if k not in glip_sd]
    unexpected = [k for k in glip_sd if k not in expected]
    mismatched = [f"{k}: {tuple(glip_sd[k].shape)} vs {expected[k]}" for k in expected
                  if k in glip_sd and tuple(glip_sd[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        raise OfficialCheckpointError(
            f"the glip_pl state dict does not match preset {_preset_name(preset)!r}: "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(mismatched)} shape mismatches {mismatched[:5]}"
        )
    # Emitted in the official module order (the reference listings' order), buffers at their places.
    windows = _block_windows(cfg)
    items: list = []
    for k, t in glip_sd.items():
        name = glip_name_to_official(k, cfg)
        if name is None:
            raise OfficialCheckpointError(f"glip_pl tensor {k!r} has no official name")
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
        raise OfficialCheckpointError("two glip_pl tensors map onto the same official name")
    return out


# --------------------------------------------------------------------------------------------- files


def _config_dict(cfg: GLIPConfig) -> dict:
    return asdict(cfg)


def import_official(src, out, preset: str, use_ema: bool = False) -> ImportReport:
    """Convert an official checkpoint file into a glip_pl checkpoint (``official_compat=True``); the report."""
    if preset not in PRESETS:
        raise OfficialCheckpointError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = get_config(preset, official_compat=True)
    official = load_official_state_dict(src, use_ema=use_ema)
    glip_sd, report = official_to_glip(official, preset)
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "config": _config_dict(cfg),
        "state_dict": glip_sd,
        "source": {"official_checkpoint": Path(src).name, "use_ema": bool(use_ema)},
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    return report


def _config_from_dict(preset: str, config: dict) -> GLIPConfig:
    """Rebuild a GLIPConfig: the preset's defaults overridden by every stored field (nested dicts allowed)."""
    config = dict(config)
    for sub in ("swin", "text"):
        if isinstance(config.get(sub), dict):
            config[sub] = {**config[sub], "pretrained": None}  # the weights come from the checkpoint
    try:
        return get_config(preset, **config)
    except GLIPInputError as e:
        raise OfficialCheckpointError(f"the checkpoint's model config does not fit this glip_pl version: {e}") from None


def read_glip_checkpoint(path, preset: Optional[str] = None) -> tuple:
    """(GLIPConfig, preset, state dict) of a glip_pl checkpoint file (weights_only load)."""
    obj = _safe_torch_load(path)
    if not isinstance(obj, dict):
        raise OfficialCheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        ck_preset, config, sd = obj.get("preset"), obj.get("config") or {}, obj.get("state_dict")
    elif isinstance(obj.get("state_dict"), dict):  # a Lightning checkpoint of the GLIP module
        hp = obj.get("hyper_parameters") or {}
        ck_preset = hp.get("preset")
        # GLIPLitModule(preset, model_options): the options are build_glip overrides ("swin__depths", ...)
        config = {k: v for k, v in (hp.get("model_options") or {}).items() if "pretrained" not in k}
        sd = obj["state_dict"]
        if any(k.startswith("model.") for k in sd):
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    elif "model" in obj:
        raise OfficialCheckpointError(
            f"{path}: this looks like an official GLIP checkpoint; convert it first with "
            "`glip-pl import-official SRC OUT --preset P`"
        )
    else:
        keys = sorted(map(str, obj))[:10]
        raise OfficialCheckpointError(f"{path}: not a glip_pl checkpoint (top-level keys: {keys})")
    if preset is not None and ck_preset is not None and preset != ck_preset:
        raise OfficialCheckpointError(f"{path}: a checkpoint of preset {ck_preset!r}, but {preset!r} was asked for")
    ck_preset = ck_preset or preset
    if ck_preset is None:
        raise OfficialCheckpointError(f"{path}: the checkpoint does not say its preset; pass one (--preset)")
    if ck_preset not in PRESETS:
        raise OfficialCheckpointError(f"{path}: unknown preset {ck_preset!r}; known: {sorted(PRESETS)}")
    if not isinstance(sd, dict) or not sd:
        raise OfficialCheckpointError(f"{path}: no state_dict in the checkpoint")
    return _config_from_dict(ck_preset, config), ck_preset, _check_tensors(sd, f"{path}['state_dict']")


def load_glip_checkpoint(path, preset: Optional[str] = None, map_location="cpu"):
    """Rebuild the GLIP model a glip_pl checkpoint describes and load its weights strictly; returns it in eval mode.

    ``preset``: when given, the checkpoint must be of this preset. A name/shape mismatch is an
    ``OfficialCheckpointError`` that lists the differences.
    """
    from .model.glip import GLIP

    cfg, ck_preset, sd = read_glip_checkpoint(path, preset)
    expected = glip_shapes(cfg)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}" for k in expected
                  if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        raise OfficialCheckpointError(
            f"{path}: the weights do not fit a {ck_preset!r} model (checkpoint of another preset or version?): "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(mismatched)} shape mismatches {mismatched[:5]}"
        )
    model = GLIP(cfg)
    model.load_state_dict(sd, strict=True)
    return model.to(map_location).eval()


def export_official(ckpt, out, preset: Optional[str] = None) -> dict:
    """Write a glip_pl checkpoint (or a Lightning one of the GLIP module) in the official layout:
    ``{"model": {"module." + official name: tensor}}``. Returns the written official state dict (unprefixed)."""
    cfg, ck_preset, sd = read_glip_checkpoint(ckpt, preset)
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
    "OfficialCheckpointError",
    "ImportReport",
    "load_official_state_dict",
    "official_to_glip",
    "glip_to_official",
    "official_name_to_glip",
    "glip_name_to_official",
    "import_official",
    "export_official",
    "load_glip_checkpoint",
    "read_glip_checkpoint",
    "glip_shapes",
    "relative_position_index",
    "official_cell_anchors",
]
