"""Tests for the extra BERT layer of a DyHead block (reference §1.5.2, §7, §8)."""

from __future__ import annotations


import pytest
import torch
from official_listing import official_block

from glip_pl.model.text_layer import IdentityTextLayer, TextLayer

SMALL = dict(hidden=64, heads=4, intermediate=128)


def make_inputs(b=2, d=64, t=9, n_valid=(9, 5), scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(b, t, d, generator=g) * scale
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(n_valid):
        mask[i, :n] = True
    return text, mask


def test_parameter_count_and_names_match_official():
    with torch.device("meta"):
        layer = TextLayer()
    assert sum(p.numel() for p in layer.parameters()) == 7_087_872
    ours = {k: list(v.shape) for k, v in layer.state_dict().items()}
    assert ours == official_block("glip_t_state_dict.txt", 1)
    assert ours == official_block("glip_l_state_dict.txt", 22)


def test_default_init_not_bert_init():
    torch.manual_seed(0)
    layer = TextLayer(**SMALL)
    # PyTorch default Linear init: biases are non-zero (BERT's init would zero them).
    assert layer.attention.self.query.bias.abs().sum() > 0
    assert layer.intermediate.dense.bias.abs().sum() > 0


def _pair():
    torch.manual_seed(0)
    sdpa = TextLayer(**SMALL, use_sdpa=True).eval()
    plain = TextLayer(**SMALL, use_sdpa=False).eval()
    plain.load_state_dict(sdpa.state_dict())
    return sdpa, plain


def test_sdpa_equals_plain_with_padding():
    sdpa, plain = _pair()
    text, mask = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(sdpa(text, mask), plain(text, mask), atol=1e-5, rtol=1e-5)  # fp32


def test_matches_hf_bert_layer():
    """Same weights in transformers' BertLayer give the same real-token outputs (no clamp acts here)."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    cfg = BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, attn_implementation="eager")
    hf = BertLayer(cfg).eval()
    ours = TextLayer(**SMALL).eval()
    hf.load_state_dict(ours.state_dict())  # strict: identical names and shapes
    text, mask = make_inputs()
    ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        ref = hf(text, attention_mask=ext)
        ref = ref[0] if isinstance(ref, tuple) else ref
        out = ours(text, mask)
    torch.testing.assert_close(out[mask], ref[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_text_padding_invariance(use_sdpa):
    torch.manual_seed(0)
    layer = TextLayer(**SMALL, use_sdpa=use_sdpa).eval()
    text, mask = make_inputs()
    extra = 6
    text_p = torch.cat([text, 100 * torch.randn(2, extra, 64)], dim=1)
    mask_p = torch.cat([mask, torch.zeros(2, extra, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a = layer(text, mask)
        b = layer(text_p, mask_p)[:, : text.shape[1]]
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_bf16_large_inputs_are_finite(use_sdpa):
    torch.manual_seed(0)
    layer = TextLayer(**SMALL, use_sdpa=use_sdpa).eval()
    text, mask = make_inputs(scale=1e4)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(layer(text, mask)).all()
        out = layer.to(torch.bfloat16)(text.bfloat16(), mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_train_mode_backward():
    layer = TextLayer(**SMALL).train()
    text, mask = make_inputs()
    layer(text, mask)[mask].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_identity_text_layer():
    layer = IdentityTextLayer()
    text, mask = make_inputs()
    assert layer(text, mask) is text
    assert len(layer.state_dict()) == 0
