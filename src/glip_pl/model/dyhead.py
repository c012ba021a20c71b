"""Vision half of a DyHead block: deformable convs across levels, scale attention, DyReLU (reference §1.5.3).

The coarser level l+1 has H_{l+1} = ceil(H_l / 2); K = 9 taps. Attribute names follow the official state dict.

The official DCNv2 kernel and ``torchvision.ops.deform_conv2d`` read offsets alike: channel 2k is dy and 2k+1 dx of
tap k = i·3 + j, mask channel k scales tap k. So the official offset conv's channels 0..17 feed torchvision
unchanged and 18..26 are the mask logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d


DEFORM_CONV_IMPLS = ("auto", "torchvision", "grid_sample")


def deform_conv3x3_grid_sample(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor,
                               stride: int) -> Tensor:
    """``torchvision.ops.deform_conv2d``'s modulated 3×3 conv (padding 1) as one ``grid_sample`` + one matmul.

    A tap corner outside the image reads 0 in torchvision, which is ``grid_sample``'s zero padding with
    align_corners False. On CPU forward + backward is 3–5× faster than torchvision's kernel (BENCHMARKS.md) at the
    cost of the B·C·9·Ho·Wo tap tensor; outputs and gradients equal torchvision's to rounding."""
    b, c, h, w = x.shape
    ho, wo = offset.shape[-2:]
    taps = torch.arange(3, device=x.device, dtype=x.dtype)
    off = offset.reshape(b, 9, 2, ho, wo)  # (dy, dx) of tap k at channels 2k, 2k+1 (a channel slice is fine)
    ys = (torch.arange(ho, device=x.device, dtype=x.dtype) * stride - 1).view(1, 1, ho, 1)
    xs = (torch.arange(wo, device=x.device, dtype=x.dtype) * stride - 1).view(1, 1, 1, wo)
    y = ys + taps.repeat_interleave(3).view(1, 9, 1, 1) + off[:, :, 0]  # (B,9,Ho,Wo) rows, pixel units
    xx = xs + taps.repeat(3).view(1, 9, 1, 1) + off[:, :, 1]
    grid = torch.stack(((2 * xx + 1) / w - 1, (2 * y + 1) / h - 1), dim=-1).view(b, 9 * ho, wo, 2)
    cols = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B,C,9·Ho,Wo)
    cols = cols.view(b, c, 9, ho * wo) * mask.reshape(b, 1, 9, ho * wo)
    out = torch.matmul(weight.reshape(weight.shape[0], c * 9), cols.view(b, c * 9, ho * wo))  # weight (O, C·9)
    return (out + bias.view(1, -1, 1)).view(b, -1, ho, wo)


class ModulatedDeformConv3x3(nn.Module):
    """DCNv2 3×3 conv (padding 1), always in fp32 like the official op; ``impl="auto"``: torchvision's kernel on
    CUDA, the grid_sample form (faster on CPU) elsewhere."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, impl: str = "auto"):
        super().__init__()
        if impl not in DEFORM_CONV_IMPLS:
            raise ValueError(f"deform_conv {impl!r}: use one of {', '.join(DEFORM_CONV_IMPLS)}")
        self.stride, self.impl = stride, impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Official ModulatedDeformConv init; not an nn.Conv2d, so the DyConv N(0, 0.01) loop skips it (reference
        # §1.5.3 "Init").
        bound = 1.0 / math.sqrt(self.weight.shape[1] * 9)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """x (B,C_in,H,W), offset (B,2K,Ho,Wo), mask (B,K,Ho,Wo) in [0,1] -> (B,C_out,Ho,Wo), dtype of x."""
        # The official op is wrapped in custom_fwd(cast_inputs=float32): same here under any autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf, off, msk, weight, bias = x.float(), offset.float(), mask.float(), self.weight.float(), self.bias.float()
            if self.impl == "torchvision" or (self.impl == "auto" and x.is_cuda):
                out = deform_conv2d(xf, off, weight, bias, stride=self.stride, padding=1, mask=msk)
            else:
                out = deform_conv3x3_grid_sample(xf, off, msk, weight, bias, self.stride)
        return out.to(x.dtype)


class Conv3x3Norm(nn.Module):

    def __init__(self, in_channels: int, out_channels: int, stride: int, groupnorm_groups: int,
                 deform_conv: str = "auto"):
        super().__init__()
        self.conv = ModulatedDeformConv3x3(in_channels, out_channels, stride, deform_conv)
        self.bn = nn.GroupNorm(groupnorm_groups, out_channels)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return self.bn(self.conv(x, offset, mask))


class HSigmoid(nn.Module):

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x + 3.0) / 6.0


class DyReLU(nn.Module):
    """Task-aware dynamic ReLU (DyHead): per-image, per-channel max of two affine maps from a GAP → MLP."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, 4 * channels),
            HSigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        coef = self.fc(x.mean(dim=(2, 3))).view(b, 4 * c, 1, 1)
        a1, b1, a2, b2 = coef.split(c, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        b1 = b1 - 0.5
        b2 = b2 - 0.5
        return torch.maximum(x * a1 + b1, x * a2 + b2)


def offsets_for_coarser_level(
    offset: Tensor, mask: Tensor, out_hw: tuple[int, int], official_compat: bool
) -> tuple[Tensor, Tensor]:
    """Level l's offset (B,2K,H_l,W_l) and mask (B,K,H_l,W_l) for ``DyConv[0]``, whose output has size out_hw.

    official_compat: the official CUDA op ignores the offset's shape and reads each image's buffer as if laid out
    for the output size (reference §1.5.3 quirk), needed to reproduce released checkpoints. Otherwise the matching
    locations, ``[..., ::2, ::2]``: output pixel i of the coarser level sits over pixel 2i of level l.
    """
    ho, wo = out_hw
    b = offset.shape[0]
    if official_compat:
        n_off, n_mask = offset.shape[1] * ho * wo, mask.shape[1] * ho * wo
        if n_off > offset[0].numel():
            raise ValueError(f"coarser level {ho}x{wo} is larger than the offset map {tuple(offset.shape[-2:])}")
        off = offset.reshape(b, -1)[:, :n_off].reshape(b, offset.shape[1], ho, wo)
        msk = mask.reshape(b, -1)[:, :n_mask].reshape(b, mask.shape[1], ho, wo)
        return off, msk
    off, msk = offset[:, :, ::2, ::2], mask[:, :, ::2, ::2]
    if tuple(off.shape[-2:]) != (ho, wo):
        raise ValueError(
            f"level sizes do not halve: offsets of a {tuple(offset.shape[-2:])} level subsample to "
            f"{tuple(off.shape[-2:])}, but the next coarser level is {ho}x{wo}; expected H_(l+1) = ceil(H_l / 2)"
        )
    return off, msk


class DyHeadBlock(nn.Module):
    """One DyHead block over all FPN levels (official ``DyConv``), levels ordered fine (P3) to coarse (P7)."""

    def __init__(self, channels: int = 256, groupnorm_groups: int = 16, official_compat: bool = False,
                 deform_conv: str = "auto"):
        super().__init__()
        self.official_compat = official_compat
        # Index 0: from the coarser level l+1 (stride 1, then upsampled); 1: same level; 2: from the finer
        # level l-1 (stride 2). Order fixed by the official keys.
        self.DyConv = nn.ModuleList(
            [
                Conv3x3Norm(channels, channels, 1, groupnorm_groups, deform_conv),
                Conv3x3Norm(channels, channels, 1, groupnorm_groups, deform_conv),
                Conv3x3Norm(channels, channels, 2, groupnorm_groups, deform_conv),
            ]
        )
        self.AttnConv = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, kernel_size=1), nn.ReLU(inplace=True)
        )
        self.h_sigmoid = HSigmoid()
        self.relu = DyReLU(channels)
        self.offset = nn.Conv2d(channels, 27, kernel_size=3, padding=1)  # PyTorch default init (official)
        # The official init loop; it finds no nn.Conv2d inside DyConv (the deformable convs are not Conv2d).
        for m in list(self.DyConv.modules()) + list(self.AttnConv.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features [(B,C,H_l,W_l)] for l = 0..L-1 (fine to coarse) -> same shapes."""
        out = []
        last = len(features) - 1
        for lvl, x in enumerate(features):
            om = self.offset(x)
            offset, mask = om[:, :18], om[:, 18:].sigmoid()
            maps = [self.DyConv[1](x, offset, mask)]
            if lvl > 0:
                finer = features[lvl - 1]
                expected = (math.ceil(finer.shape[-2] / 2), math.ceil(finer.shape[-1] / 2))
                if expected != tuple(x.shape[-2:]):
                    raise ValueError(
                        f"level {lvl} is {tuple(x.shape[-2:])} but the stride-2 conv of level {lvl - 1} "
                        f"{tuple(finer.shape[-2:])} gives {expected}; expected H_l = ceil(H_(l-1) / 2)"
                    )
                maps.append(self.DyConv[2](finer, offset, mask))
            if lvl < last:
                coarser = features[lvl + 1]
                off_c, mask_c = offsets_for_coarser_level(offset, mask, tuple(coarser.shape[-2:]), self.official_compat)
                up = self.DyConv[0](coarser, off_c, mask_c)
                maps.append(F.interpolate(up, size=x.shape[-2:], mode="bilinear", align_corners=True))
            # The mean, not the sum, of the attention-weighted maps (official).
            fused = sum(f * self.h_sigmoid(self.AttnConv(f)) for f in maps) / len(maps)
            out.append(self.relu(fused))
        return out
