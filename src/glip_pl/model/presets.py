"""Model presets: the official GLIP-T(A), GLIP-T (= T(B), T(C), GLIP-T), GLIP-L, and a tiny CPU model.

Dimensions from reference §1 (and §7 for the parameter counts each preset must reach). Presets are Python;
recipes (YAML) only change what differs (DESIGN.md practice 5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Optional

from .backbone import SwinConfig
from .language import TextEncoderConfig
from .types import GLIPInputError


@dataclass
class GLIPConfig:
    swin: SwinConfig = field(default_factory=SwinConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    channels: int = 256  # FPN / DyHead width (JOINT_EMB_SIZE)
    num_blocks: int = 6  # DYHEAD.NUM_CONVS: 6 for T, 8 for L
    fusion: str = "bi_attention"  # "bi_attention" (deep fusion, MHA-B) | "none" (GLIP-T(A))
    fusion_embed_dim: int = 2048
    fusion_heads: int = 8
    fusion_dropout: float = 0.1
    text_layer_heads: int = 12
    text_layer_intermediate: int = 3072
    use_fused_text: bool = True  # USE_FUSED_FEATURES_DOT_PRODUCT: text after the tower feeds the dot product
    groupnorm_groups: int = 16
    dropblock: bool = True
    dropblock_prob: float = 0.3
    dropblock_size: int = 3
    strides: tuple = (8, 16, 32, 64, 128)
    anchor_scale: float = 8.0
    max_text_len: int = 256
    tokenizer: Optional[str] = None  # None = bundled bert-base-uncased vocabulary
    official_compat: bool = False  # BGR-255 input, +1 boxes, flat-memory DCN offsets (see docs/official_compat)
    use_sdpa: bool = True
    deform_conv: str = "auto"  # "auto" | "torchvision" | "grid_sample" (model/dyhead.py)
    checkpoint_backbone: bool = False
    checkpoint_text: bool = False
    checkpoint_fusion: bool = False
    checkpoint_dyhead: bool = False
    topk: int = 9  # ATSS candidates per level
    prompt_tuning: bool = False  # model/prompt_tuning.py; freezes every other parameter at build time
    score_thresh: float = 0.05
    pre_nms_top_n: int = 1000
    nms_thresh: float = 0.6
    detections_per_img: int = 100

    def to_dict(self) -> dict:
        return asdict(self)


def _glip_t() -> GLIPConfig:
    return GLIPConfig()


def _glip_t_a() -> GLIPConfig:
    return GLIPConfig(fusion="none", use_fused_text=False)


def _glip_l() -> GLIPConfig:
    return GLIPConfig(
        swin=SwinConfig(
            embed_dim=192,
            depths=(2, 2, 18, 2),
            num_heads=(6, 12, 24, 48),
            window_size=12,
            drop_path_rate=0.4,
            frozen_stages=2,
            timm_name="swin_large_patch4_window12_384",
        ),
        num_blocks=8,
    )


def _tiny() -> GLIPConfig:
    """A few-MB model for CPU tests and the demo: the same structure at small widths.

    Measured on the synthetic demo (docs/experiments/pseudo_labelling.md, "Why the tiny teacher plateaued"): a
    32-wide head loses the objects' colour (box AP 0.10-0.19), the 64-wide head with 128-wide fusion reaches 0.37;
    the randomly initialised tower's fused text loses token identity, so the dot product scores the encoder's text
    (AP 0.37 vs 0.23). GLIP-T and GLIP-L, with a pretrained BERT, keep the official fused text.
    """
    return GLIPConfig(
        swin=SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7, drop_path_rate=0.0),
        text=TextEncoderConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
        channels=64,
        num_blocks=2,
        fusion_embed_dim=128,
        fusion_heads=2,
        fusion_dropout=0.0,
        text_layer_heads=2,
        text_layer_intermediate=128,
        groupnorm_groups=16,
        dropblock=False,
        use_fused_text=False,
    )


PRESETS = {
    "glip_t_a": _glip_t_a,
    "glip_t": _glip_t,
    "glip_l": _glip_l,
    "tiny": _tiny,
}

# Official parameter counts (reference §7) without the unused 80-class ``cls_logits`` conv (20,560 params),
# which glip_pl leaves out.
OFFICIAL_PARAMS = {
    "glip_t": 231_780_222 - 20_560,
    "glip_l": 430_422_384 - 20_560,
    "glip_t_a": 151_430_526 - 20_560,
}


def _apply(obj, key: str, value):
    head, _, rest = key.partition(".")
    names = {f.name for f in fields(obj)}
    if head not in names:
        raise GLIPInputError(f"unknown model option {key!r}; valid options: {sorted(names)}")
    if rest:
        sub = getattr(obj, head)
        if not is_dataclass(sub):
            raise GLIPInputError(f"model option {head!r} has no sub-option {rest!r}")
        return replace(obj, **{head: _apply(sub, rest, value)})
    cur = getattr(obj, head)
    if is_dataclass(cur) and isinstance(value, dict):
        for k, v in value.items():
            cur = _apply(cur, k, v)
        value = cur
    return replace(obj, **{head: value})


def get_config(preset: str, **overrides) -> GLIPConfig:
    if preset not in PRESETS:
        raise GLIPInputError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    for k, v in overrides.items():
        cfg = _apply(cfg, k.replace("__", "."), v)
    return cfg
