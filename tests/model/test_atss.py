"""ATSS assignment (reference §2.1): a hand-worked example, the inside-centre margin, vectorised == per-image loop."""

import pytest
import torch

from glip_pl.model.anchors import make_anchors
from glip_pl.model.atss import atss_assign, atss_assign_reference
from glip_pl.model.types import GLIPInputError

BOTH = pytest.mark.parametrize("fn", [atss_assign, atss_assign_reference], ids=["vectorised", "reference"])

# Two levels. Level 0: four 16x16 anchors centred at (4,4), (12,4), (4,12), (12,12) (a0..a3); level 1: one 32x32
# anchor centred at (8,8) (a4, fewer anchors than topk=2, so it is always a candidate).
ANCHORS = torch.tensor(
    [[-4, -4, 12, 12], [4, -4, 20, 12], [-4, 4, 12, 20], [4, 4, 20, 20], [-8, -8, 24, 24]], dtype=torch.float32
)
PER_LEVEL = [4, 1]
# Continuous IoUs of each GT's candidates (2 nearest on level 0 + a4), worked out by hand:
#  A [0,0,10,8]   ctr (5,4):    nearest a0 (d²=1), a1 (49). IoU a0 80/256=.3125, a1 48/288=.1667, a4 80/1024=.0781
#                               mean .1858 + unbiased std .1184 = .3041 -> a0 positive (centre (4,4) inside).
#  B [3,2,22,22]  ctr (12.5,12): nearest a3 (.25), a1 (64.25). IoU a3 256/380=.6737, a1 160/476=.3361, a4 .3711
#                               thr .6459 -> a3 positive (centre (12,12) inside).
#  C [0,0,14,12]  ctr (7,6):    nearest a0 (13), a1 (29). IoU a0 144/280=.5143, a1 120/304=.3947, a4 168/1024=.1641
#                               thr (unbiased std) .5357 -> nothing; a biased std would give .5031 and take a0.
#  D [-2,-3,10,10] ctr (4,3.5): nearest a0 (.25), a1 (64.25). IoU a0 156/256=.6094, a1 78/334=.2335, a4 .1523
#                               thr .5756 -> a0 positive, IoU .6094 > A's .3125 so a0 goes to D.
GTS = torch.tensor([[0, 0, 10, 8], [3, 2, 22, 22], [0, 0, 14, 12], [-2, -3, 10, 10]], dtype=torch.float32)


@BOTH
def test_hand_example(fn):
    boxes = GTS[None].repeat(3, 1, 1)
    valid = torch.tensor([[True, True, True, True], [True, True, True, False], [False] * 4])
    got = fn(ANCHORS, PER_LEVEL, boxes, valid, topk=2)
    assert got.dtype == torch.long
    assert got.tolist() == [
        [3, -1, -1, 1, -1],  # a0 claimed by A and D -> D (higher IoU); a3 -> B; C takes nothing
        [0, -1, -1, 1, -1],  # D is padding: a0 -> A
        [-1, -1, -1, -1, -1],  # no valid GT
    ]


@BOTH
def test_centre_must_be_strictly_inside_with_margin(fn):
    # Level 0: p0 [0,0,20,20] (centre (10,10)) and four far anchors (IoU 0); level 1: one 80x60 anchor.
    anchors = torch.tensor(
        [[0, 0, 20, 20], [100, 100, 120, 120], [140, 100, 160, 120], [100, 140, 120, 160], [140, 140, 160, 160],
         [-20, -20, 60, 40]], dtype=torch.float32,
    )
    # GT [x1,0,30,20]: p0 IoU ~1/3, p3 400/4800 = .083, others 0 -> thr = mean .069 + std .134 = .203, so p0 passes
    # the IoU test and only the centre test decides: l = 10 - x1 must be > 0.01.
    boxes = torch.tensor([[[10.0, 0, 30, 20]], [[9.98, 0, 30, 20]], [[9.995, 0, 30, 20]]])
    valid = torch.ones(3, 1, dtype=torch.bool)
    got = fn(anchors, [5, 1], boxes, valid, topk=5)
    assert got[:, 0].tolist() == [-1, 0, -1]  # l = 0, 0.02, 0.005
    assert (got[:, 1:] == -1).all()


@BOTH
def test_plus_one_hand_example(fn):
    # Same hand example under the +1 convention: every box is one pixel larger, the IoUs shift, the matches hold.
    got = fn(ANCHORS, PER_LEVEL, GTS[None], torch.ones(1, 4, dtype=torch.bool), topk=2, plus_one=True)
    assert got.tolist() == [[3, -1, -1, 1, -1]]


def _random_batch(seed, B=5, M=7, size=(128, 160)):
    g = torch.Generator().manual_seed(seed)
    H, W = size
    xy = torch.rand(B, M, 2, generator=g) * torch.tensor([W * 0.8, H * 0.8])
    wh = torch.rand(B, M, 2, generator=g) * torch.tensor([W * 0.6, H * 0.6]) + 2
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[:, 1] = boxes[:, 0] + torch.rand(B, 4, generator=g) * 3  # overlapping GTs (near duplicates)
    boxes[:, 2, :2] = boxes[:, 0, :2]  # a GT sharing a corner with another, larger one
    boxes[:, 2, 2:] = boxes[:, 0, 2:] + 20
    valid = torch.rand(B, M, generator=g) > 0.25
    valid[:, :3] = True
    valid[1] = False  # an image with no GT
    valid[3, 4:] = False  # padding at the end
    boxes[~valid] = 0.0
    return boxes, valid


@pytest.mark.parametrize("plus_one", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_equals_reference(seed, plus_one):
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]  # P7 has fewer anchors than topk
    anchors = make_anchors(sizes, plus_one=plus_one)
    per_level = [h * w for h, w in sizes]
    boxes, valid = _random_batch(seed)
    fast = atss_assign(anchors, per_level, boxes, valid, topk=9, plus_one=plus_one)
    slow = atss_assign_reference(anchors, per_level, boxes, valid, topk=9, plus_one=plus_one)
    assert torch.equal(fast, slow)
    assert (fast[1] == -1).all()
    assert (fast >= 0).sum() > 20  # the example is not trivially empty
    # a matched GT is always a valid one
    b = torch.arange(fast.shape[0])[:, None].expand_as(fast)
    assert valid[b[fast >= 0], fast[fast >= 0]].all()


def test_batch_independent_of_other_images():
    sizes = [(8, 10), (4, 5), (2, 3)]
    anchors = make_anchors(sizes, strides=(8, 16, 32))
    boxes, valid = _random_batch(5, B=4, size=(64, 80))
    full = atss_assign(anchors, [h * w for h, w in sizes], boxes, valid)
    for b in range(4):
        one = atss_assign(anchors, [h * w for h, w in sizes], boxes[b : b + 1], valid[b : b + 1])
        assert torch.equal(one[0], full[b])


def test_empty_and_bad_inputs():
    anchors = make_anchors([(2, 2)], strides=(8,))
    out = atss_assign(anchors, [4], torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert out.shape == (2, 4) and (out == -1).all()
    with pytest.raises(GLIPInputError):
        atss_assign(anchors, [5], torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(GLIPInputError):
        atss_assign(anchors, [4], torch.zeros(1, 1, 4), torch.ones(1, 2, dtype=torch.bool))


def test_plus_one_iou_is_honoured():
    # The +1 IoU rarely changes ATSS (the threshold adapts to the IoU scale): this image has 3 anchors whose match
    # differs between the conventions; each implementation must follow the convention it is given.
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    anchors = make_anchors(sizes, plus_one=True)
    per_level = [h * w for h, w in sizes]
    g = torch.Generator().manual_seed(17)
    xy = torch.rand(4, 32, 2, generator=g) * 120
    wh = torch.exp(torch.rand(4, 32, 2, generator=g) * 5)  # 1..148 px
    boxes = torch.cat([xy, xy + wh], -1)[3:]  # the image where the 3 differing anchors are
    valid = torch.ones(1, 32, dtype=torch.bool)
    fast = atss_assign(anchors, per_level, boxes, valid, plus_one=True)
    assert torch.equal(fast, atss_assign_reference(anchors, per_level, boxes, valid, plus_one=True))
    assert (fast != atss_assign(anchors, per_level, boxes, valid, plus_one=False)).sum() == 3


def test_nearest_breaks_ties_to_the_lower_index():
    from glip_pl.model.atss import _nearest

    g = torch.Generator().manual_seed(0)
    d = torch.randint(0, 4, (3, 5, 40), generator=g).float()  # many ties at the k-th value
    want = torch.sort(d, dim=-1, stable=True).indices[..., :9].sort(-1).values
    assert torch.equal(_nearest(d, 9), want)
    assert _nearest(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2).tolist() == [0, 1]
