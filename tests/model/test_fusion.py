"""Tests for the image⇄text fusion (reference §1.5.1, §7, §8): sizes, names, SDPA == plain, padding, bf16."""

from __future__ import annotations


import pytest
import torch
from official_listing import official_block

from glip_pl.model.fusion import BiAttentionFusion, NoFusion

SMALL = dict(v_dim=32, l_dim=48, embed_dim=64, num_heads=4)


def make_inputs(b=2, c=32, d=48, t=7, sizes=((4, 4), (2, 2), (1, 1)), n_valid=(7, 4), scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    visual = [torch.randn(b, c, h, w, generator=g) * scale for h, w in sizes]
    text = torch.randn(b, t, d, generator=g) * scale
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(n_valid):
        mask[i, :n] = True
    return visual, text, mask


def test_parameter_count_and_names_match_official():
    with torch.device("meta"):
        fusion = BiAttentionFusion(v_dim=256, l_dim=768, embed_dim=2048, num_heads=8)
    assert sum(p.numel() for p in fusion.parameters()) == 6_303_744
    ours = {k: list(v.shape) for k, v in fusion.state_dict().items()}
    assert ours == official_block("glip_t_state_dict.txt", 0)
    assert ours == official_block("glip_t_state_dict.txt", 15)
    assert ours == official_block("glip_l_state_dict.txt", 21)


def test_init():
    fusion = BiAttentionFusion(**SMALL, init_scale=1 / 8)
    blk = fusion.b_attn
    assert torch.all(blk.gamma_v == 1 / 8) and torch.all(blk.gamma_l == 1 / 8)
    for name in ("v_proj", "l_proj", "values_v_proj", "values_l_proj", "out_v_proj", "out_l_proj"):
        lin = getattr(blk.attn, name)
        assert torch.all(lin.bias == 0)
        bound = (6 / (lin.in_features + lin.out_features)) ** 0.5  # xavier_uniform
        assert lin.weight.abs().max() <= bound


def _pair(**kw):
    torch.manual_seed(0)
    sdpa = BiAttentionFusion(**SMALL, use_sdpa=True, **kw).eval()
    plain = BiAttentionFusion(**SMALL, use_sdpa=False, **kw).eval()
    plain.load_state_dict(sdpa.state_dict())
    return sdpa, plain


def test_sdpa_equals_plain_with_padding():
    sdpa, plain = _pair()
    visual, text, mask = make_inputs()
    with torch.no_grad():
        v1, l1 = sdpa(visual, text, mask)
        v2, l2 = plain(visual, text, mask)
    for a, b in zip(v1, v2):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # fp32
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)


def test_shapes_and_residual_on_normed_features():
    fusion = BiAttentionFusion(**SMALL).eval()
    visual, text, mask = make_inputs()
    with torch.no_grad():
        v, l = fusion(visual, text, mask)
    assert [x.shape for x in v] == [x.shape for x in visual] and l.shape == text.shape
    # With gamma = 0 the block returns the layer-normed inputs (residual on the normed features).
    with torch.no_grad():
        fusion.b_attn.gamma_v.zero_()
        fusion.b_attn.gamma_l.zero_()
        v, l = fusion(visual, text, mask)
    torch.testing.assert_close(l, torch.nn.functional.layer_norm(text, (48,)))
    normed = torch.nn.functional.layer_norm(visual[1].permute(0, 2, 3, 1), (32,)).permute(0, 3, 1, 2)
    torch.testing.assert_close(v[1], normed)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_text_padding_invariance(use_sdpa):
    torch.manual_seed(0)
    fusion = BiAttentionFusion(**SMALL, use_sdpa=use_sdpa).eval()
    visual, text, mask = make_inputs()
    extra = 5
    text_p = torch.cat([text, 100 * torch.randn(2, extra, 48)], dim=1)  # garbage in the padding
    mask_p = torch.cat([mask, torch.zeros(2, extra, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        v1, l1 = fusion(visual, text, mask)
        v2, l2 = fusion(visual, text_p, mask_p)
    for a, b in zip(v1, v2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1[mask], l2[:, : text.shape[1]][mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_bf16_large_inputs_are_finite(use_sdpa):
    torch.manual_seed(0)
    fusion = BiAttentionFusion(**SMALL, use_sdpa=use_sdpa).eval()
    visual, text, mask = make_inputs(scale=1e4)
    with torch.no_grad():
        # Under autocast (fp32 weights) and with the module itself in bf16.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v, l = fusion(visual, text, mask)
        assert all(torch.isfinite(x).all() for x in v) and torch.isfinite(l).all()
        fusion = fusion.to(torch.bfloat16)
        v, l = fusion([x.bfloat16() for x in visual], text.bfloat16(), mask)
    assert l.dtype == torch.bfloat16
    assert all(torch.isfinite(x).all() for x in v) and torch.isfinite(l).all()


def test_plain_path_clamps_huge_logits():
    _, plain = _pair()
    with torch.no_grad():
        plain.b_attn.attn.v_proj.weight.mul_(1e4)  # logits ~1e7, far beyond the ±50000 clamp
        v, l = plain(*make_inputs())
    assert all(torch.isfinite(x).all() for x in v) and torch.isfinite(l).all()


def test_train_mode_backward():
    fusion = BiAttentionFusion(**SMALL).train()
    visual, text, mask = make_inputs()
    v, l = fusion(visual, text, mask)
    (sum(x.sum() for x in v) + l[mask].sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fusion.parameters())


def test_no_fusion_is_identity():
    nf = NoFusion()
    visual, text, mask = make_inputs()
    v, l = nf(visual, text, mask)
    assert v is visual and l is text
    assert len(list(nf.parameters())) == 0 and len(nf.state_dict()) == 0


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_one_way_block_matches_the_visual_half_and_every_parameter_trains(use_sdpa):
    """``text_output=False`` (last block when the dot product scores the encoder's text): the visual output equals
    the two-way block's with the same weights, the text comes back layer-normed and unchanged, and every parameter
    it holds gets a gradient (DDP rejects parameters without one)."""
    torch.manual_seed(0)
    two = BiAttentionFusion(**SMALL, use_sdpa=use_sdpa).eval()
    one = BiAttentionFusion(**SMALL, use_sdpa=use_sdpa, text_output=False).eval()
    missing, unexpected = one.load_state_dict(two.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["b_attn.attn.out_l_proj.bias", "b_attn.attn.out_l_proj.weight",
                                                    "b_attn.attn.values_v_proj.bias",
                                                    "b_attn.attn.values_v_proj.weight", "b_attn.gamma_l"]
    visual, text, mask = make_inputs()
    with torch.no_grad():
        v2, _ = two(visual, text, mask)
        v1, l1 = one(visual, text, mask)
    for a, b in zip(v1, v2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, torch.nn.functional.layer_norm(text, (48,)))
    one.train()
    v, _ = one(visual, text, mask)
    sum(x.sum() for x in v).backward()
    assert all(p.grad is not None for p in one.parameters())
