"""Mixed precision by autocast (weights stay fp32): bf16, and fp16 with a GradScaler, on the tiny preset; and the
official ±50000 clamps of the fusion's attention logits keeping fp16 finite.

CPU autocast casts a different op list from CUDA's (e.g. which ops it keeps in fp32), so these tests show that the
model's own dtype handling is right under autocast, not what a GPU's numerics will be.

Tolerances (measured: 2 images at 96×128, dropout off): relative loss-term differences to fp32 ≤ 2.4e-4 (bf16)
and ≤ 4.2e-5 (fp16), grad norm ≤ 1.8e-3 (bf16) and ≤ 6e-4 (fp16). The bounds leave ~10× room.
"""

import pytest
import torch

from glip_pl.model import build_glip, make_targets
from glip_pl.model.fusion import BiMultiHeadAttention
from glip_pl.model.prompts import build_detection_prompt, spans_to_token_map

NAMES = [["red circle", "blue square"], ["green triangle", "yellow circle", "blue square"]]
BOXES = [
    ([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]], [0, 1]),
    ([[30.0, 30.0, 90.0, 80.0]], [1]),
]
RTOL = {torch.bfloat16: dict(loss=3e-3, grad_norm=2e-2), torch.float16: dict(loss=1e-3, grad_norm=1e-2)}
FP16_MAX = torch.finfo(torch.float16).max  # 65504


def _model(**kw):
    torch.manual_seed(0)
    model = build_glip("tiny", dropblock=False, fusion_dropout=0.0, **kw)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def _batch(model, h=96, w=128):
    g = torch.Generator().manual_seed(0)
    batch, sizes = model.batch_images([torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in NAMES])
    prompts = [build_detection_prompt(n) for n in NAMES]
    text, offsets = model.tokenize([p.caption for p in prompts])
    maps = [spans_to_token_map(p.caption, p.spans, o, text.length) for p, o in zip(prompts, offsets)]
    pos = [maps[i][torch.tensor(lab)] for i, (_, lab) in enumerate(BOXES)]
    return batch, sizes, text, make_targets([torch.tensor(b) for b, _ in BOXES], pos, text.length)


def _terms(model, batch, dtype):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        terms = model.loss(model(*batch[:3]), batch[3])
        total = model.criterion.total(terms)
    return terms, total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_step_matches_fp32(dtype):
    model = _model()
    batch = _batch(model)
    ref, total = _terms(model, batch, None)
    total.backward()
    ref_norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    terms, total = _terms(model, batch, dtype)
    assert all(v.dtype == torch.float32 for v in terms.values())  # the criterion computes in fp32
    total.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None))
    for k in ref:
        torch.testing.assert_close(terms[k], ref[k], rtol=RTOL[dtype]["loss"], atol=0.0, msg=k)
    torch.testing.assert_close(norm, ref_norm, rtol=RTOL[dtype]["grad_norm"], atol=0.0)


@pytest.mark.parametrize(
    "dtype,kw",
    [(torch.bfloat16, {}), (torch.float16, dict(use_sdpa=False))],  # fp16: the clamped plain attention
    ids=["bf16", "fp16-gradscaler"],
)
def test_twenty_steps_stay_finite_and_train(dtype, kw):
    """20 applied optimizer steps with every loss term, gradient and weight finite. With fp16 the GradScaler's
    first scale (65536) is too large for this model once it trains (measured: step 6 overflows at 65536, its
    unscaled gradients are finite with max |g| 1.6); the scaler then skips that step and halves the scale — its
    designed behaviour, allowed here at most 3 times, and the weights must come through a skip unchanged."""
    model = _model(**kw)
    batch = _batch(model, h=64, w=128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    totals, applied, skipped = [], 0, 0
    while applied < 20:
        assert skipped <= 3, f"GradScaler skipped {skipped} steps"
        opt.zero_grad(set_to_none=True)
        terms, total = _terms(model, batch, dtype)
        assert all(torch.isfinite(v) for v in terms.values()), (applied, terms)
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        grads_finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        before = [p.detach().clone() for p in model.parameters()] if not grads_finite else None
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(opt)
        scaler.update()
        if grads_finite:
            applied += 1
            totals.append(total.item())
        else:  # only the scaler may see non-finite gradients: it skipped the step and lowered the scale
            assert scaler.is_enabled() and scaler.get_scale() < scale, f"non-finite gradient at step {applied}"
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            skipped += 1
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), (applied, name)

    # the steps trained (measured: 3.70 -> 1.34 in bf16, 1.35 in fp16 after one skip)
    assert totals[-1] < 0.7 * totals[0], totals


def _attention(clamp):
    torch.manual_seed(0)
    return BiMultiHeadAttention(v_dim=32, l_dim=48, embed_dim=64, num_heads=2, dropout=0.0, use_sdpa=False,
                                clamp=clamp)


def _large_inputs(scale=300.0):
    """Visual (2,40,32) and text (2,6,48) features whose attention logits reach ~2e5 in fp32 (> fp16's 65504)."""
    g = torch.Generator().manual_seed(0)
    v, l = torch.randn(2, 40, 32, generator=g) * scale, torch.randn(2, 6, 48, generator=g) * scale
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    return v, l, mask


def _max_logit(attn, v, l):
    with torch.no_grad():
        q, k = attn._heads(attn.v_proj(v)), attn._heads(attn.l_proj(l))
        return (q @ k.transpose(-1, -2)).abs().max().item() * attn.scale


@pytest.mark.parametrize("mode", ["half-weights", "autocast"])
def test_fusion_clamps_keep_fp16_finite(mode):
    v, l, mask = _large_inputs()
    assert _max_logit(_attention(True), v, l) > 2 * FP16_MAX  # the precondition: these logits overflow fp16

    def run(clamp):
        attn = _attention(clamp)
        vv, ll = v.clone().requires_grad_(), l.clone().requires_grad_()
        if mode == "half-weights":
            attn = attn.half()
            vv, ll = v.half().requires_grad_(), l.half().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16, enabled=mode == "autocast"):
            dv, dl = attn(vv, ll, mask)
        assert dv.dtype == dl.dtype == torch.float16
        (dv.float().square().mean() + dl.float().square().mean()).backward()
        return dv, dl, vv.grad, ll.grad, [p.grad for p in attn.parameters()]

    dv, dl, gv, gl, gp = run(clamp=False)
    assert not (torch.isfinite(dv).all() and torch.isfinite(dl).all())  # without the clamps fp16 overflows
    dv, dl, gv, gl, gp = run(clamp=True)
    for t in (dv, dl, gv, gl, *gp):
        assert torch.isfinite(t).all()
