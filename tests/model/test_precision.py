"""A model whose weights are cast to bf16/fp16 (no autocast): what DeepSpeed's bf16/fp16 modes run, and what
Lightning makes of ``precision: bf16-mixed`` under the ZeRO recipe. Forward, loss, backward and ``predict`` must
run, stay finite and agree with the fp32 model.

Tolerances (measured on the tiny preset, 2 images at 96×128, dropout off): relative loss-term differences to fp32
were ≤ 3.7e-4 (bf16) and ≤ 2.7e-4 (fp16), grad-norm differences ≤ 5.2e-3 (bf16, plain attention) and ≤ 1.5e-4
(fp16); the bounds below leave ~10× room. bf16 keeps 8 significant bits (relative step 2^-8 = 3.9e-3), so the
weights alone move by that much: a bound much under 1e-3 on single values would be luck.
"""

import copy

import pytest
import torch

from glip_pl.model import build_glip, make_targets
from glip_pl.model.prompts import build_detection_prompt, spans_to_token_map

NAMES = [["red circle", "blue square"], ["green triangle", "yellow circle", "blue square"]]
BOXES = [
    ([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]], [0, 1]),
    ([[30.0, 30.0, 90.0, 80.0]], [1]),
]
LOSS_RTOL = 5e-3
GRAD_NORM_RTOL = 5e-2
# A score is sqrt(sigmoid(logit) · sigmoid(centerness)); the cast model's logits near -4.6 (the prior) are rounded
# to bf16's step there, 2^-5, which moves sigmoid by up to 1.6 % relative and the score by about half that per
# factor (measured 5.4e-3 with plain attention).
SCORE_RTOL = 2e-2


def _model(**kw):
    torch.manual_seed(0)
    model = build_glip("tiny", dropblock=False, fusion_dropout=0.0, **kw)
    for m in model.modules():  # dropout off so fp32 and the cast model compute the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _batch(model, h=96, w=128):
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in NAMES]
    batch, sizes = model.batch_images(images)
    prompts = [build_detection_prompt(n) for n in NAMES]
    text, offsets = model.tokenize([p.caption for p in prompts])  # image 0's prompt is padded: 3 padding tokens
    maps = [spans_to_token_map(p.caption, p.spans, o, text.length) for p, o in zip(prompts, offsets)]
    boxes = [torch.tensor(b) for b, _ in BOXES]
    pos = [maps[i][torch.tensor(lab)] for i, (_, lab) in enumerate(BOXES)]
    return images, batch, sizes, text, make_targets(boxes, pos, text.length)


def _step(model, batch, sizes, text, targets):
    """Loss terms (float) and the gradient norm (fp32) of one forward + loss + backward in training mode."""
    model.train().zero_grad(set_to_none=True)
    out = model(batch, sizes, text)
    terms = model.loss(out, targets)
    model.criterion.total(terms).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(g.dtype == next(model.parameters()).dtype for g in grads)
    assert all(torch.isfinite(g).all() for g in grads), "non-finite gradient"
    assert all(torch.isfinite(getattr(out, k)).all() for k in ("logits", "box_regression", "centerness"))
    norm = torch.sqrt(sum(g.float().square().sum() for g in grads))
    return {k: v.item() for k, v in terms.items()}, norm.item()


@pytest.mark.parametrize(
    "dtype,kw",
    [
        (torch.bfloat16, dict(deform_conv="grid_sample")),
        (torch.bfloat16, dict(deform_conv="torchvision")),
        (torch.bfloat16, dict(use_sdpa=False, use_fused_text=True)),  # plain attention with its clamps
        (torch.float16, dict(deform_conv="grid_sample")),
    ],
    ids=["bf16-grid_sample", "bf16-torchvision", "bf16-plain-fused_text", "fp16-grid_sample"],
)
def test_cast_model_trains_and_predicts_like_fp32(dtype, kw):
    ref_model = _model(**kw)
    model = copy.deepcopy(ref_model).to(dtype)
    images, batch, sizes, text, targets = _batch(ref_model)
    ref_terms, ref_norm = _step(ref_model, batch, sizes, text, targets)
    terms, norm = _step(model, batch, sizes, text, targets)
    for k, v in ref_terms.items():
        assert abs(terms[k] - v) <= LOSS_RTOL * abs(v), (k, terms[k], v)
    assert abs(norm - ref_norm) <= GRAD_NORM_RTOL * ref_norm, (norm, ref_norm)

    # predict: every score is kept (threshold 0) so both models return detections to compare
    ref_dets = ref_model.eval().predict(images, NAMES, score_thresh=0.0)
    dets = model.eval().predict(images, NAMES, score_thresh=0.0)
    for d, r in zip(dets, ref_dets):
        assert len(d.scores) > 0 and d.boxes.dtype == torch.float32
        assert torch.isfinite(d.boxes).all() and torch.isfinite(d.scores).all()
        # The best score of an image: sqrt(phrase prob · centerness prob), both near their init values here.
        torch.testing.assert_close(d.scores.max(), r.scores.max(), rtol=SCORE_RTOL, atol=0.0)


def test_cast_model_official_compat_normalisation_is_finite():
    """The official BGR-255 normalisation (values up to ~2.6) also reaches a bf16 backbone in its dtype."""
    model = _model(official_compat=True).to(torch.bfloat16).eval()
    images, batch, sizes, text, _ = _batch(model)
    with torch.no_grad():
        feats = model.encode_image(batch, sizes)
    assert all(f.dtype == torch.bfloat16 and torch.isfinite(f).all() for f in feats)
