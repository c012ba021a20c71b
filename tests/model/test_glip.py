"""The assembled tiny GLIP on CPU: forward/backward/loss, batch == per image, text-padding invariance,
official-compat normalisation, overfitting one batch, and clear errors for bad input."""

import pytest
import torch

from glip_pl.model import build_glip, make_targets
from glip_pl.model.glip import BGR255_MEAN, BGR255_STD
from glip_pl.model.prompts import build_detection_prompt, spans_to_token_map
from glip_pl.model.types import GLIPInputError


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_glip("tiny", **kw)


def _images(n, h=96, w=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in range(n)]


def _batch(model, names_per_image, boxes_per_image, h=96, w=128, pad_to=None):
    images, sizes = model.batch_images(_images(len(names_per_image), h, w))
    prompts = [build_detection_prompt(n) for n in names_per_image]
    text, offsets = model.tokenize([p.caption for p in prompts], pad_to=pad_to)
    maps = [spans_to_token_map(p.caption, p.spans, o, text.length) for p, o in zip(prompts, offsets)]
    boxes = [torch.tensor(b, dtype=torch.float32) for b, _ in boxes_per_image]
    pos = [maps[i][torch.tensor(lab, dtype=torch.long)] for i, (_, lab) in enumerate(boxes_per_image)]
    return images, sizes, text, make_targets(boxes, pos, text.length), maps


BOXES = [
    ([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]], [0, 1]),
    ([[30.0, 30.0, 90.0, 80.0]], [1]),
]
NAMES = [["red circle", "blue square"], ["green triangle", "yellow circle", "blue square"]]


def test_forward_backward_loss_terms():
    model = _model()
    model.train()
    images, sizes, text, targets, _ = _batch(model, NAMES, BOXES)
    out = model(images, sizes, text)
    N = sum(h * w for h, w in out.level_sizes)
    assert out.logits.shape == (2, N, text.length)
    assert out.box_regression.shape == (2, N, 4) and out.centerness.shape == (2, N)
    assert out.level_sizes[0] == (96 // 8, 128 // 8) and len(out.level_sizes) == 5
    terms = model.loss(out, targets)
    assert set(terms) == {"loss_token", "loss_reg", "loss_centerness"}
    total = model.criterion.total(terms)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the text encoder, the fusion and the head all receive gradient
    for prefix in ("language_backbone.", "head.dyhead_tower.0.b_attn", "backbone.body", "head.bias0"):
        assert any(n.startswith(prefix) and p.grad.abs().sum() > 0 for n, p in model.named_parameters()), prefix


def test_batch_equals_each_image_alone():
    model = _model().eval()
    images, sizes, text, _, _ = _batch(model, NAMES, BOXES)
    with torch.no_grad():
        both = model(images, sizes, text)
        for i in range(2):
            t_i, _ = model.tokenize([build_detection_prompt(NAMES[i]).caption])
            one = model(images[i:i + 1], sizes[i:i + 1], t_i)
            T = t_i.length
            torch.testing.assert_close(both.logits[i, :, :T], one.logits[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(both.box_regression[i], one.box_regression[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(both.centerness[i], one.centerness[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("preset_kw", [{}, {"fusion": "none", "use_fused_text": False}])
def test_padding_text_to_256_changes_nothing(preset_kw):
    model = _model(**preset_kw).eval()
    images, sizes, text, targets, maps = _batch(model, NAMES, BOXES)
    padded = text.pad_to(256)
    with torch.no_grad():
        a = model(images, sizes, text)
        b = model(images, sizes, padded)
    T = text.length
    torch.testing.assert_close(a.logits, b.logits[..., :T], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(a.box_regression, b.box_regression, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(a.centerness, b.centerness, atol=2e-5, rtol=1e-4)
    la = model.criterion.total(model.loss(a, targets))
    lb = model.criterion.total(model.loss(b, targets.pad_text_to(256)))
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)


def test_sdpa_equals_plain_attention_end_to_end():
    fast = _model(use_sdpa=True).eval()
    plain = _model(use_sdpa=False).eval()
    plain.load_state_dict(fast.state_dict())
    images, sizes, text, _, _ = _batch(fast, NAMES, BOXES)
    with torch.no_grad():
        a, b = fast(images, sizes, text), plain(images, sizes, text)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_official_compat_normalisation_is_bgr255():
    model = _model(official_compat=True)
    img = torch.randint(0, 256, (1, 3, 32, 64), dtype=torch.uint8)
    x = model.normalize(img, torch.tensor([[20, 40]]))
    bgr = img.float().flip(1)
    ref = (bgr - torch.tensor(BGR255_MEAN).view(1, 3, 1, 1)) / torch.tensor(BGR255_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x[..., :20, :40], ref[..., :20, :40])
    assert x[..., 20:, :].abs().sum() == 0 and x[..., :, 40:].abs().sum() == 0  # padding is zero after normalising


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    ref = _model().train()
    ck = _model(checkpoint_fusion=True, checkpoint_text=True, checkpoint_dyhead=True, checkpoint_backbone=True).train()
    ck.load_state_dict(ref.state_dict())
    images, sizes, text, targets, _ = _batch(ref, NAMES, BOXES)
    for m in (ref, ck):
        m.zero_grad()
        torch.manual_seed(1)  # same dropout masks in both runs (checkpointing replays the RNG state)
        m.criterion.total(m.loss(m(images, sizes, text), targets)).backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), ck.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_tiny_model_overfits_one_batch():
    """Token focal + GIoU losses (whose minimum is 0) fall 10x; centerness BCE against soft targets cannot
    (its floor is the entropy of the targets, ~0.63 here), so it only has to decrease."""
    model = _model(seed=1)
    model.train()
    images, sizes, text, targets, _ = _batch(model, NAMES, BOXES, h=64, w=96)
    targets.boxes[..., 0::2].clamp_(max=95)
    targets.boxes[..., 1::2].clamp_(max=63)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for step in range(300):
        terms = model.loss(model(images, sizes, text), targets)
        loss = model.criterion.total(terms)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
        if step > 20 and history[-1]["loss_token"] + history[-1]["loss_reg"] < (history[0]["loss_token"] + history[0]["loss_reg"]) / 10:
            break
    first, last = history[0], history[-1]
    assert last["loss_token"] + last["loss_reg"] < (first["loss_token"] + first["loss_reg"]) / 10, (first, last, len(history))
    assert last["loss_centerness"] < first["loss_centerness"]


def test_predict_returns_phrases_in_original_coordinates():
    model = _model().eval()
    dets = model.predict(_images(1, 64, 96), ["a red circle. a blue square"], orig_sizes=[(128, 192)],
                         score_thresh=0.0)
    d = dets[0]
    assert len(d) > 0 and d.phrases == ["a red circle", "a blue square"]
    assert float(d.boxes[:, 2].max()) <= 192 + 1e-3 and float(d.boxes[:, 3].max()) <= 128 + 1e-3
    assert set(d.labels.tolist()) <= {0, 1}


def test_bad_inputs_get_clear_errors():
    model = _model()
    imgs = _images(2)
    with pytest.raises(GLIPInputError, match="image #1 is torch.float32"):
        model.batch_images([imgs[0], imgs[1].float() / 255])
    with pytest.raises(GLIPInputError, match="image #1 has 1 channels"):
        model.batch_images([imgs[0], imgs[1][:1]])
    with pytest.raises(GLIPInputError, match=r"image #0, box #1: x2 < x1"):
        make_targets([torch.tensor([[0.0, 0, 10, 10], [20.0, 0, 10, 10]])], [torch.ones(2, 4)], 4)
    with pytest.raises(GLIPInputError, match="empty prompt"):
        model.predict(imgs[:1], [""])
    with pytest.raises(GLIPInputError, match="outside the caption"):
        from glip_pl.model.prompts import Prompt

        model.predict(imgs[:1], [Prompt("a cat", [[(0, 30)]], ["a cat"])])


@pytest.mark.parametrize("preset_kw", [{}, {"use_fused_text": False}, {"fusion": "none", "use_fused_text": False}])
def test_every_parameter_gets_a_gradient(preset_kw):
    """DDP (find_unused_parameters off, as the official recipes) needs a gradient for every parameter: true with
    the fused text, with the encoder's text and deep fusion (the last block is one-way), and without fusion."""
    model = _model(**preset_kw).train()
    images, sizes, text, targets, _ = _batch(model, NAMES, BOXES)
    model.criterion.total(model.loss(model(images, sizes, text), targets)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
