"""Tests for the DyHead vision block (reference §1.5.3, §7, §8): sizes, names, deformable conv, offsets, forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from official_listing import official_block

from glip_pl.model import build_glip
from glip_pl.model.dyhead import (DyHeadBlock, ModulatedDeformConv3x3, deform_conv3x3_grid_sample,
                                  offsets_for_coarser_level)

C = 32
SIZES = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def features(sizes=SIZES, b=2, c=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=g) for h, w in sizes]


def test_parameter_count_and_names_match_official():
    with torch.device("meta"):
        block = DyHeadBlock(256)
    assert sum(p.numel() for p in block.parameters()) == 1_917_276
    ours = {k: list(v.shape) for k, v in block.state_dict().items()}
    assert ours == official_block("glip_t_state_dict.txt", 2)
    assert ours == official_block("glip_t_state_dict.txt", 17)
    assert ours == official_block("glip_t_a_state_dict.txt", 0)  # GLIP-T(A): the tower is DyConv only
    assert ours == official_block("glip_l_state_dict.txt", 23)


def test_init():
    torch.manual_seed(0)
    block = DyHeadBlock(C, groupnorm_groups=16)
    for conv3 in block.DyConv:
        assert conv3.conv.weight.abs().max() <= 1 / math.sqrt(C * 9)
        assert torch.all(conv3.conv.bias == 0)
    attn = block.AttnConv[1]
    assert torch.all(attn.bias == 0) and attn.weight.std() < 0.02  # N(0, 0.01)
    assert block.offset.weight.abs().max() <= 1 / math.sqrt(C * 9)  # PyTorch default (kaiming_uniform a=√5)
    assert block.offset.bias.abs().sum() > 0


IMPLS = ["torchvision", "grid_sample"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
def test_zero_offsets_unit_mask_equals_conv2d(stride, impl):
    torch.manual_seed(0)
    conv = ModulatedDeformConv3x3(8, 6, stride=stride, impl=impl)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 8, 9, 7)
    ho, wo = math.ceil(9 / stride), math.ceil(7 / stride)
    out = conv(x, torch.zeros(2, 18, ho, wo), torch.ones(2, 9, ho, wo))
    ref = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def reference_mdcn(x, offset, mask, weight, bias, stride):
    """DCNv2 written out with grid_sample: channel 2k = dy, 2k+1 = dx, mask channel k, tap k = i·3 + j."""
    b, _, h, w = x.shape
    ho, wo = offset.shape[-2:]
    base_y = (torch.arange(ho, dtype=x.dtype) * stride - 1)[:, None].expand(ho, wo)
    base_x = (torch.arange(wo, dtype=x.dtype) * stride - 1)[None, :].expand(ho, wo)
    out = bias.view(1, -1, 1, 1).expand(b, -1, ho, wo).clone()
    for i in range(3):
        for j in range(3):
            k = i * 3 + j
            y = base_y + i + offset[:, 2 * k]  # (B,Ho,Wo), pixel units
            xx = base_x + j + offset[:, 2 * k + 1]
            grid = torch.stack([2 * xx / (w - 1) - 1, 2 * y / (h - 1) - 1], dim=-1)  # align_corners=True
            sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            out = out + torch.einsum("oc,bchw->bohw", weight[:, :, i, j], sampled * mask[:, k : k + 1])
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
def test_offset_layout_matches_dcnv2_reference(stride, impl):
    """Random offsets/mask: torchvision's layout is the official (dy, dx)-interleaved one (and so is ours)."""
    torch.manual_seed(0)
    conv = ModulatedDeformConv3x3(4, 5, stride=stride, impl=impl)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 4, 8, 9)
    ho, wo = math.ceil(8 / stride), math.ceil(9 / stride)
    offset = 2.5 * torch.randn(2, 18, ho, wo)
    mask = torch.rand(2, 9, ho, wo)
    out = conv(x, offset, mask)
    ref = reference_mdcn(x, offset, mask, conv.weight, conv.bias, stride)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape,stride", [((2, 4, 8, 9), 1), ((2, 4, 8, 9), 2), ((1, 3, 1, 5), 1), ((1, 2, 2, 1), 2)])
def test_grid_sample_form_equals_torchvision_values_and_gradients(shape, stride):
    """The CPU path (one grid_sample + matmul) is torchvision's deform_conv2d: same outputs and the same gradients
    for input, offsets, mask, weight and bias, in float64, with offsets that carry taps past every border (and
    1-pixel-high / -wide inputs, where a naive align_corners normalisation would divide by zero)."""
    from torchvision.ops import deform_conv2d

    g = torch.Generator().manual_seed(sum(shape) + stride)
    b, c, h, w = shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    offset = 3.0 * torch.randn(b, 18, ho, wo, generator=g, dtype=torch.float64)
    mask = torch.rand(b, 9, ho, wo, generator=g, dtype=torch.float64)
    weight = torch.randn(5, c, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, offset, mask, weight, bias)]
    ref = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    out = deform_conv3x3_grid_sample(x, offset, mask, weight, bias, stride)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads_ref = torch.autograd.grad((ref * up).sum(), inputs)
    grads = torch.autograd.grad((out * up).sum(), inputs)
    for name, a, e in zip(("x", "offset", "mask", "weight", "bias"), grads, grads_ref):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-9, msg=name)


def test_model_option_picks_the_deformable_conv_kernel():
    """``deform_conv`` reaches every DyHead conv; "auto" is torchvision's kernel on CUDA and the grid_sample form on
    CPU, and both give the tiny model's outputs to fp32 rounding; an unknown name is a clear error."""
    torch.manual_seed(0)
    auto = build_glip("tiny", dropblock=False).eval()
    tv = build_glip("tiny", dropblock=False, deform_conv="torchvision").eval()
    tv.load_state_dict(auto.state_dict())
    convs = [m for m in tv.modules() if isinstance(m, ModulatedDeformConv3x3)]
    assert convs and all(m.impl == "torchvision" for m in convs)
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8)
    sizes = torch.tensor([[96, 128], [80, 120]])
    text, _ = auto.tokenize(["red circle. blue square."] * 2)
    with torch.no_grad():
        a, t = auto(images, sizes, text), tv(images, sizes, text)
    torch.testing.assert_close(a.logits, t.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.box_regression, t.box_regression, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="deform_conv 'cuda'"):
        ModulatedDeformConv3x3(4, 4, impl="cuda")


def test_official_compat_offsets_are_the_flat_memory_reinterpretation():
    b, hl, wl, ho, wo = 2, 5, 6, 3, 3
    offset = torch.arange(b * 18 * hl * wl, dtype=torch.float32).view(b, 18, hl, wl)
    mask = -torch.arange(b * 9 * hl * wl, dtype=torch.float32).view(b, 9, hl, wl)
    off, msk = offsets_for_coarser_level(offset, mask, (ho, wo), official_compat=True)
    for i in range(b):  # what the CUDA kernel reads: image i's buffer, laid out for the output size
        torch.testing.assert_close(off[i], offset[i].reshape(-1)[: 18 * ho * wo].view(18, ho, wo))
        torch.testing.assert_close(msk[i], mask[i].reshape(-1)[: 9 * ho * wo].view(9, ho, wo))
    # e.g. tap 0's dy at output (0, 1) is element 1 of image 1's buffer, dx of tap 0 starts at element 9
    assert off[1, 0, 0, 1] == offset[1].reshape(-1)[1] and off[1, 1, 0, 0] == offset[1].reshape(-1)[ho * wo]
    # also correct on the non-contiguous channel slice the block passes in
    om = torch.randn(b, 27, hl, wl)
    off2, _ = offsets_for_coarser_level(om[:, :18], om[:, 18:], (ho, wo), official_compat=True)
    torch.testing.assert_close(off2[1], om[1, :18].reshape(-1)[: 18 * ho * wo].view(18, ho, wo))


def test_default_offsets_subsample_matching_locations():
    offset, mask = torch.randn(2, 18, 5, 6), torch.rand(2, 9, 5, 6)
    off, msk = offsets_for_coarser_level(offset, mask, (3, 3), official_compat=False)
    torch.testing.assert_close(off, offset[:, :, ::2, ::2])
    torch.testing.assert_close(msk, mask[:, :, ::2, ::2])
    with pytest.raises(ValueError, match="ceil"):
        offsets_for_coarser_level(offset, mask, (2, 3), official_compat=False)


@pytest.mark.parametrize("official_compat", [False, True])
def test_forward_shapes(official_compat):
    torch.manual_seed(0)
    block = DyHeadBlock(C, groupnorm_groups=16, official_compat=official_compat).eval()
    feats = features()
    with torch.no_grad():
        out = block(feats)
    assert [o.shape for o in out] == [f.shape for f in feats]
    assert all(torch.isfinite(o).all() for o in out)


def test_forward_matches_written_out_math():
    """Two levels, compat mode: level 0 = DyReLU(mean of attn-weighted DyConv[1](x0), up(DyConv[0](x1)))."""
    torch.manual_seed(0)
    block = DyHeadBlock(C, groupnorm_groups=16, official_compat=True).eval()
    with torch.no_grad():
        block.AttnConv[1].weight.normal_(0, 0.5)  # make the scale attention non-trivial
        x0, x1 = features([(6, 6), (3, 3)])
        out0, out1 = block([x0, x1])
        om = block.offset(x0)
        off, msk = om[:, :18], om[:, 18:].sigmoid()
        off_c = torch.stack([off[i].reshape(-1)[: 18 * 9].view(18, 3, 3) for i in range(2)])
        msk_c = torch.stack([msk[i].reshape(-1)[: 9 * 9].view(9, 3, 3) for i in range(2)])
        same = block.DyConv[1](x0, off, msk)
        up = F.interpolate(block.DyConv[0](x1, off_c, msk_c), size=(6, 6), mode="bilinear", align_corners=True)

        def attn(f):
            s = F.relu(block.AttnConv[1](f.mean(dim=(2, 3), keepdim=True)))
            return torch.clamp(s + 3, 0, 6) / 6

        fused = (same * attn(same) + up * attn(up)) / 2
        a1, b1, a2, b2 = block.relu.fc(fused.mean(dim=(2, 3)))[:, :, None, None].split(C, dim=1)
        expected = torch.maximum(fused * (2 * a1) + (b1 - 0.5), fused * (2 * a2 - 1) + (b2 - 0.5))
    torch.testing.assert_close(out0, expected, atol=1e-5, rtol=1e-5)
    assert out1.shape == x1.shape


def test_compat_only_changes_levels_that_use_the_coarser_conv():
    torch.manual_seed(0)
    default = DyHeadBlock(C, groupnorm_groups=16).eval()
    compat = DyHeadBlock(C, groupnorm_groups=16, official_compat=True).eval()
    compat.load_state_dict(default.state_dict())
    feats = features(SIZES[:3])
    with torch.no_grad():
        a, b = default(feats), compat(feats)
    torch.testing.assert_close(a[-1], b[-1])  # the coarsest level has no DyConv[0] branch
    assert not torch.allclose(a[0], b[0])


def test_sizes_that_do_not_halve_raise():
    block = DyHeadBlock(C, groupnorm_groups=16)
    with pytest.raises(ValueError, match="ceil"):
        block(features([(8, 8), (3, 3)]))


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    block = DyHeadBlock(C, groupnorm_groups=16).train()
    feats = [f.requires_grad_() for f in features(SIZES[:3])]
    sum(o.square().mean() for o in block(feats)).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(f.grad is not None for f in feats)


@pytest.mark.parametrize("impl", ["grid_sample", "torchvision"])
def test_bf16_runs_deformable_conv_in_fp32(impl):
    """Under bf16 autocast and with bf16 weights the block agrees with fp32: relative (Frobenius) error per level
    ≤ 2e-2 and max abs error ≤ 3e-2 on outputs of magnitude ~1 (measured 0.63–0.91 % and ≤ 0.014: bf16's step
    at 1 is 2^-7, compounded through the offset conv, GroupNorm and DyReLU). The deformable conv itself computes
    in fp32, as the official ``custom_fwd(cast_inputs=float32)`` op: given the same bf16-rounded inputs and
    weights it equals the fp32 conv up to the final rounding of its output."""
    torch.manual_seed(0)
    block = DyHeadBlock(C, groupnorm_groups=16, deform_conv=impl).eval()
    feats = features(SIZES[:3])
    with torch.no_grad():
        ref = block(feats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_out = block(feats)
        cast = copy.deepcopy(block).to(torch.bfloat16)
        cast_out = cast([f.bfloat16() for f in feats])
    for name, out in (("autocast", autocast_out), ("bf16 weights", cast_out)):
        for lvl, (o, r) in enumerate(zip(out, ref)):
            assert torch.isfinite(o).all(), (name, lvl)
            assert ((o.float() - r).norm() / r.norm()).item() <= 2e-2, (name, lvl)
            assert (o.float() - r).abs().max().item() <= 3e-2, (name, lvl)
    assert all(o.dtype == torch.bfloat16 for o in cast_out)

    conv = cast.DyConv[1].conv
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, C, 8, 8, generator=g).bfloat16()
    offset = (torch.randn(2, 18, 8, 8, generator=g) * 2).bfloat16()
    mask = torch.rand(2, 9, 8, 8, generator=g).bfloat16()
    fp32_conv = copy.deepcopy(conv).float()  # the bf16 weights, exactly, in fp32
    with torch.no_grad():
        exact = fp32_conv(x.float(), offset.float(), mask.float())
        torch.testing.assert_close(conv(x, offset, mask), exact.bfloat16(), rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not lower the conv's matmul to bf16
            under_autocast = fp32_conv(x.float(), offset.float(), mask.float())
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=0, atol=0)
