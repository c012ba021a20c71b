"""Image encoder: Swin (timm) + FPN P3–P7 at C channels, DropBlock on P3/P4 (reference §1.2–1.3).

Input (B, 3, H, W) with H, W multiples of 32; outputs P3..P7 at strides 8..128. torchvision's FPN with
``LastLevelP6P7`` has the official convs and init (P6 from P5's output, P7 from ReLU(P6)).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

log = logging.getLogger(__name__)


@dataclass
class SwinConfig:
    embed_dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    window_size: int = 7
    drop_path_rate: float = 0.2
    frozen_stages: int = -1  # official FREEZE_CONV_BODY_AT: 2 freezes patch_embed + stage 1 (GLIP-L)
    pretrained: Optional[str] = None  # ImageNet Swin weights: a local file (timm or Microsoft format) or a hub name
    timm_name: str = "swin_tiny_patch4_window7_224"
    extra: dict = field(default_factory=dict)

    @property
    def out_channels(self) -> tuple:
        return tuple(self.embed_dim * 2**i for i in (1, 2, 3))


class DropBlock2d(nn.Module):
    """Official DropBlock (``layers/dropblock.py``)."""

    def __init__(self, drop_prob: float = 0.3, block_size: int = 3):
        super().__init__()
        self.drop_prob, self.block_size = drop_prob, block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        gamma = self.drop_prob / self.block_size**2
        seeds = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < gamma).to(x.dtype)
        dropped = F.max_pool2d(seeds, self.block_size, stride=1, padding=self.block_size // 2)
        keep = 1.0 - dropped
        # Counted in fp32: a bf16 sum of millions of ones is off by up to 0.4 %.
        return x * keep * (keep.numel() / keep.sum(dtype=torch.float32).clamp_min(1.0))


def _official_window_attention(self, x: Tensor) -> Tensor:
    """timm window attention in the official order (GLIP ``swint.py``): pad, then roll. timm rolls then pads, which
    differs at the bottom/right border when a stage's map is not a multiple of the window. x (B,H,W,C)."""
    from timm.models.swin_transformer import window_partition, window_reverse

    _, H, W, C = x.shape
    wh, ww = self.window_size
    x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
    Hp, Wp = x.shape[1], x.shape[2]
    shifted = any(self.shift_size)
    if shifted:
        x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
    mask = self.get_attn_mask(x) if shifted else None  # regions of the padded, rolled map
    windows = window_partition(x, self.window_size).view(-1, self.window_area, C)
    windows = self.attn(windows, mask=mask).view(-1, wh, ww, C)
    x = window_reverse(windows, self.window_size, Hp, Wp)
    if shifted:
        x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


class SwinBody(nn.Module):
    """timm Swin returning C3, C4, C5 (NCHW), each through its own LayerNorm (official ``norm1..3``)."""

    def __init__(self, cfg: SwinConfig, official_compat: bool = False):
        super().__init__()
        import timm

        kwargs = dict(
            features_only=True,
            out_indices=(1, 2, 3),
            embed_dim=cfg.embed_dim,
            depths=tuple(cfg.depths),
            num_heads=tuple(cfg.num_heads),
            window_size=cfg.window_size,
            drop_path_rate=cfg.drop_path_rate,
            strict_img_size=False,  # any input size; shifted-window masks are built per size
            always_partition=True,  # shift even when a stage's map is smaller than the 224-based window
            **cfg.extra,
        )
        if cfg.pretrained:
            from ..hub import resolve_swin

            # A file either way, so that timm's checkpoint filter also reads the official Microsoft key layout.
            weights = resolve_swin(cfg.pretrained, timm_name=cfg.timm_name)
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=weights))
            log.info("swin: loading ImageNet weights from %s", weights)
        self.swin = timm.create_model(cfg.timm_name, **kwargs)
        chans = cfg.out_channels
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(c) for c in chans)
        self.out_channels = chans
        if official_compat:
            import types

            from timm.models.swin_transformer import SwinTransformerBlock

            for m in self.swin.modules():
                if isinstance(m, SwinTransformerBlock):
                    m._attn = types.MethodType(_official_window_attention, m)
        self._freeze(cfg.frozen_stages)

    def _freeze(self, frozen_stages: int) -> None:
        """Official ``_freeze_stages``; an official stage's patch merging sits at the start of timm's next stage."""
        frozen = []
        if frozen_stages >= 0:
            frozen.append(self.swin.patch_embed)
        for i in range(0, max(frozen_stages - 1, 0)):
            frozen.append(getattr(self.swin, f"layers_{i}").blocks)
            frozen.append(getattr(self.swin, f"layers_{i + 1}").downsample)
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.swin.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> list:
        feats = self.swin(x)  # NHWC
        return [norm(f).permute(0, 3, 1, 2).contiguous() for norm, f in zip((self.norm1, self.norm2, self.norm3), feats)]


class GLIPFPN(FeaturePyramidNetwork):
    """torchvision FPN whose P3/P4 merged maps pass DropBlock before their 3×3 output conv (official)."""

    def __init__(self, in_channels: tuple, channels: int, dropblock: Optional[DropBlock2d]):
        super().__init__(list(in_channels), channels, extra_blocks=LastLevelP6P7(channels, channels))
        self.dropblock = dropblock

    def get_result_from_layer_blocks(self, x: Tensor, idx: int) -> Tensor:
        if self.dropblock is not None and idx in (0, 1):  # idx 0 = P3, 1 = P4
            x = self.dropblock(x)
        return super().get_result_from_layer_blocks(x, idx)


class ImageBackbone(nn.Module):
    """Swin + FPN: (B, 3, H, W) normalised image → [P3, P4, P5, P6, P7], each (B, C, H/s, W/s)."""

    def __init__(self, swin: SwinConfig, channels: int = 256, dropblock: bool = True, dropblock_prob: float = 0.3,
                 dropblock_size: int = 3, official_compat: bool = False):
        super().__init__()
        self.body = SwinBody(swin, official_compat=official_compat)
        self.fpn = GLIPFPN(self.body.out_channels, channels, DropBlock2d(dropblock_prob, dropblock_size) if dropblock else None)
        self.channels = channels

    def forward(self, images: Tensor) -> list:
        c3, c4, c5 = self.body(images)
        out = self.fpn(OrderedDict([("c3", c3), ("c4", c4), ("c5", c5)]))
        return list(out.values())
