"""GroundingCriterion (reference §2.3-2.4): each term against independent hand formulas, batch == per-image loop."""

import math

import pytest
import torch

from glip_pl.model.anchors import make_anchors
from glip_pl.model.atss import atss_assign
from glip_pl.model.box_coder import BoxCoder
from glip_pl.model.losses import GroundingCriterion, criterion_reference
from glip_pl.model.types import GLIPInputError, GroundingOutputs, Targets

# The hand example of test_atss: 2x2 level of 16x16 anchors (a0..a3) + one 32x32 anchor (a4); with topk=2,
# GT A [0,0,10,8] alone matches a0 and GT B [3,2,22,22] alone matches a3.
ANCHORS = torch.tensor(
    [[-4, -4, 12, 12], [4, -4, 20, 12], [-4, 4, 12, 20], [4, 4, 20, 20], [-8, -8, 24, 24]], dtype=torch.float32
)
LEVELS = [(2, 2), (1, 1)]
A = [0.0, 0.0, 10.0, 8.0]
B_BOX = [3.0, 2.0, 22.0, 22.0]


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _focal(x, y, alpha=0.25, gamma=2.0):
    p = _sig(x)
    ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
    p_t = p * y + (1 - p) * (1 - y)
    a_t = alpha * y + (1 - alpha) * (1 - y)
    return a_t * (1 - p_t) ** gamma * ce


def _bce(z, y):
    return -(y * math.log(_sig(z)) + (1 - y) * math.log(1 - _sig(z)))


def _giou_loss(p, g):
    iw = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
    ih = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    encl = (max(p[2], g[2]) - min(p[0], g[0])) * (max(p[3], g[3]) - min(p[1], g[1]))
    return 1 - (inter / union - (encl - union) / encl)


def _decode(d, a):
    """Continuous Faster R-CNN decode with weights (10, 10, 5, 5)."""
    w, h = a[2] - a[0], a[3] - a[1]
    cx, cy = a[0] + w / 2 + d[0] / 10 * w, a[1] + h / 2 + d[1] / 10 * h
    pw, ph = w * math.exp(d[2] / 5), h * math.exp(d[3] / 5)
    return [cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2]


def _tiny(valid=True):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, generator=g) * 2
    deltas = torch.randn(2, 5, 4, generator=g) * 0.3
    ctr = torch.randn(2, 5, generator=g)
    outputs = GroundingOutputs(
        logits=logits.requires_grad_(),
        box_regression=deltas.requires_grad_(),
        centerness=ctr.requires_grad_(),
        anchors=ANCHORS,
        level_sizes=LEVELS,
        text_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool),
    )
    targets = Targets(
        boxes=torch.tensor([[A, [0.0] * 4], [B_BOX, [0.0] * 4]]),
        valid=torch.tensor([[valid, False], [valid, False]]),
        positive_map=torch.tensor([[[0.0, 1, 1, 0], [0] * 4], [[1.0, 1, 0, 0], [0] * 4]]),
    )
    return outputs, targets


def _criterion(**kw):
    return GroundingCriterion(BoxCoder(), topk=2, **kw)


def test_terms_against_hand_values():
    outputs, targets = _tiny()
    terms = _criterion()(outputs, targets)
    assert set(terms) == {"loss_token", "loss_reg", "loss_centerness"}
    x, d, z = outputs.logits.tolist(), outputs.box_regression.tolist(), outputs.centerness.tolist()
    positive = {(0, 0): [0, 1, 1, 0], (1, 3): [1, 1, 0, 0]}  # (image, anchor) -> token targets
    ntok = [3, 2]  # text_mask
    focal = sum(
        _focal(x[b][n][t], positive.get((b, n), [0] * 4)[t]) for b in range(2) for n in range(5) for t in range(ntok[b])
    )
    num_pos = 2
    assert terms["loss_token"].item() == pytest.approx(focal / num_pos, rel=1e-5)

    # centerness targets: a0 centre (4,4) in A: l=4, r=6, t=4, b=4; a3 centre (12,12) in B: l=9, r=10, t=b=10
    c0, c1 = math.sqrt(4 / 6 * 4 / 4), math.sqrt(9 / 10 * 10 / 10)
    g0 = _giou_loss(_decode(d[0][0], ANCHORS[0].tolist()), A)
    g1 = _giou_loss(_decode(d[1][3], ANCHORS[3].tolist()), B_BOX)
    assert terms["loss_reg"].item() == pytest.approx((g0 * c0 + g1 * c1) / (c0 + c1), rel=1e-5)
    bce = _bce(z[0][0], c0) + _bce(z[1][3], c1)
    assert terms["loss_centerness"].item() == pytest.approx(bce / num_pos, rel=1e-5)


def test_total_uses_the_weights():
    outputs, targets = _tiny()
    crit = _criterion()
    assert crit.weights == {"loss_token": 1.0, "loss_reg": 2.0, "loss_centerness": 1.0}
    t = crit(outputs, targets)
    assert crit.total(t).item() == pytest.approx((t["loss_token"] + 2 * t["loss_reg"] + t["loss_centerness"]).item())
    crit5 = _criterion(weights={"loss_reg": 5.0})
    assert crit5.weights["loss_reg"] == 5.0 and crit5.weights["loss_token"] == 1.0
    assert crit5.total(t).item() == pytest.approx((t["loss_token"] + 5 * t["loss_reg"] + t["loss_centerness"]).item())
    with pytest.raises(GLIPInputError):
        _criterion(weights={"loss_cls": 1.0})
    with pytest.raises(GLIPInputError):
        GroundingCriterion(BoxCoder(plus_one=False), plus_one=True)


def test_masked_tokens_do_not_count():
    outputs, targets = _tiny()
    base = _criterion()(outputs, targets)["loss_token"]
    with torch.no_grad():
        outputs.logits[0, :, 3] = 30.0  # padding token of image 0
        outputs.logits[1, :, 2:] = -7.0
    assert _criterion()(outputs, targets)["loss_token"].item() == pytest.approx(base.item(), rel=1e-6)


def test_zero_positives_are_finite_zeros_with_grads():
    outputs, targets = _tiny(valid=False)
    crit = _criterion()
    terms = crit(outputs, targets)
    assert terms["loss_reg"].item() == 0.0 and terms["loss_centerness"].item() == 0.0
    x = outputs.logits.tolist()
    focal = sum(_focal(x[b][n][t], 0.0) for b in range(2) for n in range(5) for t in range([3, 2][b]))
    assert terms["loss_token"].item() == pytest.approx(focal, rel=1e-5)  # normaliser max(0, 1) = 1
    crit.total(terms).backward()
    for t in (outputs.logits, outputs.box_regression, outputs.centerness):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert (outputs.box_regression.grad == 0).all()


def test_reduce_mean_hook_is_called_and_changes_the_normaliser():
    outputs, targets = _tiny()
    base = _criterion()(outputs, targets)
    calls = []

    def fake_all_reduce_mean(t):
        calls.append(t.clone())
        return t * 4  # as if the other ranks had 4x as many positives on average

    got = _criterion()(outputs, targets, reduce_mean=fake_all_reduce_mean)
    assert len(calls) == 1  # one collective per forward
    assert calls[0][0].item() == 2.0  # local number of positives
    for k in base:
        assert got[k].item() == pytest.approx(base[k].item() / 4, rel=1e-6)
    crit = _criterion()
    crit.reduce_mean = fake_all_reduce_mean  # set as an attribute by the training shell
    crit(*_tiny(valid=False))  # still called with zero positives (every rank must join the collective)
    assert len(calls) == 2 and calls[1].tolist() == [0.0, 0.0, 0.0]
    assert crit(outputs, targets)["loss_reg"].item() == pytest.approx(base["loss_reg"].item() / 4, rel=1e-6)


def test_runs_in_fp32():
    outputs, targets = _tiny()
    outputs.logits = outputs.logits.detach().bfloat16()
    outputs.box_regression = outputs.box_regression.detach().bfloat16()
    terms = _criterion()(outputs, targets.to(dtype=torch.bfloat16))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


def _random_case(seed, plus_one, B=4, M=6, T=10):
    g = torch.Generator().manual_seed(seed)
    sizes = [(8, 10), (4, 5), (2, 3), (1, 2), (1, 1)]
    anchors = make_anchors(sizes, plus_one=plus_one)
    N = anchors.shape[0]
    xy = torch.rand(B, M, 2, generator=g) * torch.tensor([64.0, 48.0])
    wh = torch.rand(B, M, 2, generator=g) * 60 + 4
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[:, 1] = boxes[:, 0] + 1.5  # overlapping GTs
    valid = torch.rand(B, M, generator=g) > 0.3
    valid[:, 0] = True
    valid[2] = False  # an image without GT
    pmap = (torch.rand(B, M, T - 2, generator=g) > 0.6).float()  # shorter than T: padded by the criterion
    lengths = torch.tensor([T, 7, 5, 9])
    mask = torch.arange(T)[None] < lengths[:, None]
    outputs = GroundingOutputs(
        logits=(torch.randn(B, N, T, generator=g) * 3).requires_grad_(),
        box_regression=(torch.randn(B, N, 4, generator=g) * 0.5).requires_grad_(),
        centerness=torch.randn(B, N, generator=g).requires_grad_(),
        anchors=anchors,
        level_sizes=sizes,
        text_mask=mask,
    )
    return outputs, Targets(boxes=boxes, valid=valid, positive_map=pmap)


@pytest.mark.parametrize("plus_one", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_equals_per_image_reference(seed, plus_one):
    outputs, targets = _random_case(seed, plus_one)
    crit = GroundingCriterion(BoxCoder(plus_one=plus_one), plus_one=plus_one)
    fast = crit(outputs, targets)
    grads_fast = torch.autograd.grad(crit.total(fast), [outputs.logits, outputs.box_regression, outputs.centerness])
    slow = criterion_reference(crit, outputs, targets)
    grads_slow = torch.autograd.grad(crit.total(slow), [outputs.logits, outputs.box_regression, outputs.centerness])
    for k in fast:
        assert fast[k].item() == pytest.approx(slow[k].item(), rel=1e-5), k
        assert fast[k].item() > 0
    for a, b in zip(grads_fast, grads_slow):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_shape_errors_name_the_input():
    outputs, targets = _tiny()
    outputs.text_mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(GLIPInputError, match="text_mask"):
        _criterion()(outputs, targets)
    outputs, targets = _tiny()
    outputs.level_sizes = [(2, 2)]
    with pytest.raises(GLIPInputError, match="level_sizes"):
        _criterion()(outputs, targets)


# ------------------------------------------------------------------------------------------- ignore regions


def _with_ignore(targets, boxes, valid, imap):
    from dataclasses import replace

    t = lambda v: v if isinstance(v, torch.Tensor) else torch.tensor(v)  # noqa: E731
    return replace(targets, ignore_boxes=t(boxes), ignore_valid=t(valid), ignore_map=t(imap))


def test_ignore_region_drops_exactly_its_negative_entries():
    outputs, targets = _tiny()
    # image 0: region [0,0,10,10] holds the centres of a0 (4,4) and a4 (8,8); tokens 0 and 1. a0 is positive for
    # tokens 1, 2 (GT A): its token 1 still trains, its token 0 does not; a4 (negative) loses tokens 0 and 1.
    # image 1: a padding row (valid False) that would cover everything.
    ign = _with_ignore(targets, [[[0.0, 0, 10, 10]], [[-50.0, -50, 50, 50]]], [[True], [False]],
                       [[[1.0, 1, 0, 0]], [[1.0, 1, 1, 1]]])
    terms = _criterion()(outputs, ign)
    x = outputs.logits.tolist()
    positive = {(0, 0): [0, 1, 1, 0], (1, 3): [1, 1, 0, 0]}
    dropped = {(0, 0, 0), (0, 4, 0), (0, 4, 1)}
    focal = sum(
        _focal(x[b][n][t], positive.get((b, n), [0] * 4)[t])
        for b in range(2) for n in range(5) for t in range([3, 2][b]) if (b, n, t) not in dropped
    )
    assert terms["loss_token"].item() == pytest.approx(focal / 2, rel=1e-5)  # positives (normaliser) unchanged
    base = _criterion()(outputs, targets)
    for k in ("loss_reg", "loss_centerness"):
        assert terms[k].item() == pytest.approx(base[k].item(), rel=1e-6)
    # the dropped entries get no gradient; a kept positive inside the region does
    _criterion().total(terms).backward()
    g = outputs.logits.grad
    assert g[0, 0, 0] == 0 and g[0, 4, 0] == 0 and g[0, 4, 1] == 0
    assert g[0, 0, 1] != 0 and g[0, 4, 2] != 0 and g[0, 1, 0] != 0


def test_ignore_regions_absent_or_all_padding_change_nothing():
    outputs, targets = _tiny()
    base = _criterion()(outputs, targets)
    for ign in (_with_ignore(targets, [[[0.0, 0, 30, 30]], [[0.0, 0, 30, 30]]], [[False], [False]],
                             [[[1.0] * 4], [[1.0] * 4]]),
                _with_ignore(targets, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), torch.zeros(2, 0, 4))):
        got = _criterion()(outputs, ign)
        for k in base:
            assert got[k].item() == base[k].item()


@pytest.mark.parametrize("seed", [0, 1])
def test_ignore_regions_vectorised_equal_per_anchor_reference(seed):
    from dataclasses import replace

    outputs, targets = _random_case(seed, plus_one=False)
    g = torch.Generator().manual_seed(100 + seed)
    B, K, T = 4, 3, 8  # the map shorter than the logits' 10 tokens: padded like positive_map
    xy = torch.rand(B, K, 2, generator=g) * 40
    ign = replace(targets, ignore_boxes=torch.cat([xy, xy + torch.rand(B, K, 2, generator=g) * 40 + 4], -1),
                  ignore_valid=torch.rand(B, K, generator=g) > 0.3,
                  ignore_map=(torch.rand(B, K, T, generator=g) > 0.5).float())
    crit = GroundingCriterion(BoxCoder())
    fast, slow = crit(outputs, ign), criterion_reference(crit, outputs, ign)
    plain = crit(outputs, targets)
    assert fast["loss_token"].item() < plain["loss_token"].item()  # the regions removed some negatives
    for k in fast:
        assert fast[k].item() == pytest.approx(slow[k].item(), rel=1e-5), k
    a = torch.autograd.grad(crit.total(fast), outputs.logits)[0]
    b = torch.autograd.grad(crit.total(slow), outputs.logits)[0]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_ignore_region_errors_name_the_field():
    from dataclasses import replace

    outputs, targets = _tiny()
    with pytest.raises(GLIPInputError, match="all of ignore_boxes, ignore_valid and ignore_map"):
        _criterion()(outputs, replace(targets, ignore_boxes=torch.zeros(2, 1, 4)))
    bad = _with_ignore(targets, [[[0.0, 0, 10, 10]], [[0.0, 0, 10, 10]]], [[True], [True]], [[[1.0] * 4]])
    with pytest.raises(GLIPInputError, match="ignore_map"):
        _criterion()(outputs, bad)
    bad = _with_ignore(targets, [[[0.0, 0, 10, 10]], [[0.0, 0, 10, 10]]], [[True, True], [True, True]],
                       [[[1.0] * 4], [[1.0] * 4]])
    with pytest.raises(GLIPInputError, match="ignore_valid"):
        _criterion()(outputs, bad)


def test_with_text_length_pads_or_cuts_both_token_maps():
    t = Targets(boxes=torch.zeros(1, 1, 4), valid=torch.ones(1, 1, dtype=torch.bool),
                positive_map=torch.tensor([[[1.0, 0, 0]]]), ignore_boxes=torch.zeros(1, 1, 4),
                ignore_valid=torch.ones(1, 1, dtype=torch.bool), ignore_map=torch.tensor([[[0.0, 0, 0, 1, 0]]]))
    p = t.with_text_length(6)
    assert p.positive_map.shape == p.ignore_map.shape == (1, 1, 6) and p.ignore_map[0, 0, 3] == 1
    assert t.with_text_length(4).positive_map.shape == (1, 1, 4)
    with pytest.raises(GLIPInputError, match="ignore_map marks tokens beyond the prompt's 3 tokens"):
        t.with_text_length(3)
    assert t.pad_text_to(2) is t


# ---------------------------------------------------------------------------------------------- box weights


def test_box_weight_scales_regression_and_centerness_against_hand_values():
    from dataclasses import replace

    outputs, targets = _tiny()
    d, z = outputs.box_regression.tolist(), outputs.centerness.tolist()
    c0, c1 = math.sqrt(4 / 6 * 4 / 4), math.sqrt(9 / 10 * 10 / 10)
    g0 = _giou_loss(_decode(d[0][0], ANCHORS[0].tolist()), A)
    g1 = _giou_loss(_decode(d[1][3], ANCHORS[3].tolist()), B_BOX)
    b0, b1 = _bce(z[0][0], c0), _bce(z[1][3], c1)
    base = _criterion()(outputs, targets)
    w0, w1 = 0.25, 1.0  # box A (image 0) at a quarter, box B as gold; the padding rows' weights do not matter
    terms = _criterion()(outputs, replace(targets, box_weight=torch.tensor([[w0, 9.0], [w1, 0.0]])))
    assert terms["loss_reg"].item() == pytest.approx((w0 * g0 * c0 + w1 * g1 * c1) / (w0 * c0 + w1 * c1), rel=1e-5)
    assert terms["loss_centerness"].item() == pytest.approx((w0 * b0 + w1 * b1) / (w0 + w1), rel=1e-5)
    assert terms["loss_token"].item() == base["loss_token"].item()  # the token loss trains every box fully
    # weight 0: box A's anchor gets no regression / centerness gradient, its token logits still do
    terms = _criterion()(outputs, replace(targets, box_weight=torch.tensor([[0.0, 0.0], [1.0, 0.0]])))
    assert terms["loss_reg"].item() == pytest.approx(g1, rel=1e-5)
    assert terms["loss_centerness"].item() == pytest.approx(b1, rel=1e-5)
    _criterion().total(terms).backward()
    assert (outputs.box_regression.grad[0] == 0).all() and (outputs.centerness.grad[0] == 0).all()
    assert (outputs.box_regression.grad[1, 3] != 0).any() and outputs.centerness.grad[1, 3] != 0
    assert (outputs.logits.grad[0, 0, :3] != 0).all()


def test_box_weight_of_ones_changes_nothing_and_bad_weights_name_the_field():
    from dataclasses import replace

    outputs, targets = _random_case(0, plus_one=False)
    crit = GroundingCriterion(BoxCoder())
    base = crit(outputs, targets)
    ones = crit(outputs, replace(targets, box_weight=torch.ones(targets.valid.shape)))
    for k in base:
        assert ones[k].item() == base[k].item()
    for bad, match in ((torch.ones(4, 5), r"box_weight must be \(B=4, M=6\)"),
                       (torch.full((4, 6), -1.0), "finite and >= 0"),
                       (torch.full((4, 6), float("nan")), "finite and >= 0")):
        with pytest.raises(GLIPInputError, match=match):
            crit(outputs, replace(targets, box_weight=bad))


@pytest.mark.parametrize("seed", [0, 1])
def test_box_weight_vectorised_equals_per_image_reference(seed):
    from dataclasses import replace

    outputs, targets = _random_case(seed, plus_one=False)
    g = torch.Generator().manual_seed(200 + seed)
    w = torch.rand(targets.valid.shape, generator=g)
    w[1] = 0.0  # an image whose boxes train the token loss only
    weighted = replace(targets, box_weight=w)
    crit = GroundingCriterion(BoxCoder())
    fast, slow, plain = crit(outputs, weighted), criterion_reference(crit, outputs, weighted), crit(outputs, targets)
    assert fast["loss_reg"].item() != pytest.approx(plain["loss_reg"].item(), rel=1e-3)
    for k in fast:
        assert fast[k].item() == pytest.approx(slow[k].item(), rel=1e-5), k
    params = [outputs.logits, outputs.box_regression, outputs.centerness]
    for a, b in zip(torch.autograd.grad(crit.total(fast), params), torch.autograd.grad(crit.total(slow), params)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------ fixed shapes (issue 22, compile)


def test_giou_on_whole_tensors_equals_torchvision_values_and_grads():
    """``_giou_loss`` (no boolean indexing) against torchvision's function: overlapping, disjoint, touching,
    inverted (flattened first) and degenerate boxes, values and gradients."""
    import torchvision

    from glip_pl.model.losses import _flatten_inverted, _giou_loss

    g = torch.Generator().manual_seed(3)
    xy = torch.rand(64, 2, generator=g) * 50
    pred = torch.cat([xy, xy + torch.randn(64, 2, generator=g) * 20], -1)  # some inverted
    xy = torch.rand(64, 2, generator=g) * 50
    gt = torch.cat([xy, xy + torch.rand(64, 2, generator=g) * 30], -1)
    pred[0] = gt[0] + torch.tensor([gt[0, 2] - gt[0, 0], 0.0, gt[0, 2] - gt[0, 0], 0.0])  # touching edge
    pred[1] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # a point
    gt[2] = torch.tensor([0.0, 0.0, 0.0, 0.0])  # a zero-area GT
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    ours = _giou_loss(p1, gt)
    theirs = torchvision.ops.generalized_box_iou_loss(_flatten_inverted(p2), gt, reduction="none")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    (ours * torch.arange(64.0)).sum().backward()
    (theirs * torch.arange(64.0)).sum().backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=0, atol=0)


def test_masked_out_entries_cannot_leak_into_the_loss_or_its_gradient():
    """Masked terms are computed for every anchor and token; what is masked out (padding tokens, background anchors)
    must not change the loss nor get a gradient, even when those outputs are NaN or huge."""
    outputs, targets = _random_case(0, plus_one=False)
    crit = GroundingCriterion(BoxCoder())
    base = crit(outputs, targets)
    pos = atss_assign(outputs.anchors, outputs.num_anchors_per_level, targets.boxes, targets.valid) >= 0
    assert pos.any() and not pos.all()
    logits = outputs.logits.detach().clone()
    logits[~outputs.text_mask[:, None, :].expand_as(logits)] = float("nan")
    deltas = outputs.box_regression.detach().clone()
    deltas[~pos] = float("nan")
    ctr = outputs.centerness.detach().clone()
    ctr[~pos] = 1e30
    bad = GroundingOutputs(logits=logits.requires_grad_(), box_regression=deltas.requires_grad_(),
                           centerness=ctr.requires_grad_(), anchors=outputs.anchors,
                           level_sizes=outputs.level_sizes, text_mask=outputs.text_mask)
    got = crit(bad, targets)
    for k in base:
        assert got[k].item() == pytest.approx(base[k].item(), rel=1e-6), k
    crit.total(got).backward()
    assert (bad.logits.grad[~outputs.text_mask[:, None, :].expand_as(logits)] == 0).all()
    assert (bad.box_regression.grad[~pos] == 0).all() and (bad.centerness.grad[~pos] == 0).all()
    assert torch.isfinite(bad.box_regression.grad).all() and torch.isfinite(bad.logits.grad).all()


def test_targets_without_any_box_column():
    """M = 0 (no image of the batch has a box): only the token loss, as with all boxes invalid."""
    outputs, targets = _tiny(valid=False)
    empty = Targets(boxes=torch.zeros(2, 0, 4), valid=torch.zeros(2, 0, dtype=torch.bool),
                    positive_map=torch.zeros(2, 0, 4))
    crit = _criterion()
    got, want = crit(outputs, empty), crit(outputs, targets)
    for k in want:
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-6), k


def test_bad_box_weights_stop_a_compiled_criterion_too():
    """Under torch.compile the value check is a device-side assert (a Python ``if`` would break the graph): the same
    message, raised by the compiled graph. (aot_eager: TorchDynamo + AOTAutograd, no code generation.)"""
    from dataclasses import replace

    outputs, targets = _tiny()
    crit = _criterion()
    compiled = torch.compile(crit, backend="aot_eager", fullgraph=True)
    w = torch.ones(targets.valid.shape)
    ok = compiled(outputs, replace(targets, box_weight=w))
    want = crit(outputs, replace(targets, box_weight=w))
    for k in want:
        assert ok[k].item() == pytest.approx(want[k].item(), rel=1e-5), k
    w[1, 0] = -1.0
    with pytest.raises(RuntimeError, match="box_weight must be finite and >= 0"):
        compiled(outputs, replace(targets, box_weight=w))
