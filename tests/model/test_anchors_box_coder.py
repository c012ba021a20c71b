"""Anchors (reference §1.5.4) and the box coder / +1 IoU / NMS helpers."""

import math

import pytest
import torch

from glip_pl.model.anchors import make_anchors
from glip_pl.model.box_coder import BoxCoder, box_iou, nms
from glip_pl.model.types import GLIPInputError

OFFICIAL_CELLS = [
    [-28, -28, 35, 35],
    [-56, -56, 71, 71],
    [-112, -112, 143, 143],
    [-224, -224, 287, 287],
    [-448, -448, 575, 575],
]


def test_official_cell_anchors_plus_one():
    a = make_anchors([(1, 1)] * 5, plus_one=True)
    assert a.dtype == torch.float32
    assert a.tolist() == OFFICIAL_CELLS


def test_anchor_order_and_shifts_plus_one():
    sizes = [(2, 3), (1, 2)]
    a = make_anchors(sizes, plus_one=True)
    assert a.shape == (2 * 3 + 1 * 2, 4)
    # level 0 (stride 8), index = y*W + x: (x=2, y=1) -> index 5, shifted by (16, 8)
    assert a[5].tolist() == [-28 + 16, -28 + 8, 35 + 16, 35 + 8]
    assert a[1].tolist() == [-28 + 8, -28, 35 + 8, 35]  # x=1, y=0
    # level 1 (stride 16) starts after the 6 level-0 anchors
    assert a[6].tolist() == OFFICIAL_CELLS[1]
    assert a[7].tolist() == [-56 + 16, -56, 71 + 16, 71]


def test_anchors_continuous_default():
    a = make_anchors([(2, 2), (1, 1)], strides=(8, 16), anchor_scale=8.0)
    # centre ((x+0.5)*s, (y+0.5)*s), side 8*s
    assert a[0].tolist() == [4 - 32, 4 - 32, 4 + 32, 4 + 32]
    assert a[3].tolist() == [12 - 32, 12 - 32, 12 + 32, 12 + 32]
    assert a[4].tolist() == [8 - 64, 8 - 64, 8 + 64, 8 + 64]
    b = make_anchors([(3, 4)], anchor_scale=4.0, dtype=torch.float64)
    assert b.dtype == torch.float64
    ctr = (b[:, :2] + b[:, 2:]) / 2
    assert torch.equal(ctr[4 * 2 + 3], torch.tensor([3.5 * 8, 2.5 * 8], dtype=torch.float64))
    assert torch.allclose(b[:, 2] - b[:, 0], torch.full((12,), 32.0, dtype=torch.float64))


def test_anchors_too_many_levels():
    with pytest.raises(GLIPInputError):
        make_anchors([(1, 1)] * 6)


def test_encode_hand_values():
    anchor = torch.tensor([0.0, 0.0, 10.0, 10.0])
    gt = torch.tensor([2.0, 2.0, 12.0, 22.0])
    # continuous: anchor w=h=10, ctr 5; gt w=10, h=20, ctr (7, 12)
    d = BoxCoder(plus_one=False).encode(gt, anchor)
    assert torch.allclose(d, torch.tensor([10 * 2 / 10, 10 * 7 / 10, 0.0, 5 * math.log(2.0)]))
    # +1: anchor w=h=11, ctr 5.5; gt w=11, h=21, ctr (7.5, 12.5)
    d1 = BoxCoder(plus_one=True).encode(gt, anchor)
    assert torch.allclose(d1, torch.tensor([10 * 2 / 11, 10 * 7 / 11, 0.0, 5 * math.log(21 / 11)]))


def test_decode_official_plus_one_formula():
    anchor = torch.tensor([-28.0, -28.0, 35.0, 35.0])  # w = 64, ctr = 4
    d = torch.tensor([1.0, -2.0, 5 * math.log(2.0), 0.0])
    box = BoxCoder(plus_one=True).decode(d, anchor)
    cx, cy, w, h = 4 + 0.1 * 64, 4 - 0.2 * 64, 128.0, 64.0
    assert torch.allclose(box, torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2 - 1, cy + h / 2 - 1]))


def test_decode_clamps_dw_dh():
    anchor = torch.tensor([0.0, 0.0, 16.0, 16.0])
    box = BoxCoder().decode(torch.tensor([0.0, 0.0, 1e4, 1e4]), anchor)
    assert torch.allclose(box[2] - box[0], torch.tensor(1000.0))  # exp(log(1000/16)) * 16


@pytest.mark.parametrize("plus_one", [False, True])
def test_round_trip_and_broadcast(plus_one):
    g = torch.Generator().manual_seed(0)
    anchors = make_anchors([(4, 5), (2, 3)], plus_one=plus_one)  # (N, 4)
    xy = torch.rand(3, anchors.shape[0], 2, generator=g) * 100
    wh = torch.rand(3, anchors.shape[0], 2, generator=g) * 200 + 2
    gt = torch.cat([xy, xy + wh], -1)  # (B, N, 4)
    coder = BoxCoder(plus_one=plus_one)
    deltas = coder.encode(gt, anchors)
    assert deltas.shape == gt.shape
    assert torch.allclose(coder.decode(deltas, anchors), gt, atol=1e-3)
    # a single anchor broadcast against many deltas
    one = coder.decode(deltas[:, :1], anchors[:1])
    assert torch.allclose(one, gt[:, :1], atol=1e-3)


def test_iou_plus_one_shift_equals_hand_formula():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 4.0, 19.0]])
    b = torch.tensor([[5.0, 5.0, 14.0, 14.0]])
    # +1: areas 10*10 and 5*20; intersections 5*5 and 0 (x: 5..4 empty)
    assert torch.allclose(box_iou(a, b, plus_one=True), torch.tensor([[25 / 175], [0.0]]))
    # continuous: areas 81 and 76; intersections 4*4 and 0
    assert torch.allclose(box_iou(a, b, plus_one=False), torch.tensor([[16 / 146], [0.0]]))

    def hand(p, q):
        iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]) + 1)
        ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]) + 1)
        area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
        return iw * ih / (area(p) + area(q) - iw * ih)

    g = torch.Generator().manual_seed(1)
    xy = torch.randint(0, 50, (20, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.randint(0, 40, (20, 2), generator=g).float()], -1)
    got = box_iou(boxes, boxes[:7], plus_one=True)
    want = torch.tensor([[hand(p.tolist(), q.tolist()) for q in boxes[:7]] for p in boxes])
    assert torch.allclose(got, want, atol=1e-6)


def test_nms_plus_one_and_per_label():
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [3.0, 0.0, 12.0, 9.0]])
    scores = torch.tensor([0.9, 0.8])
    same = torch.tensor([0, 0])
    # +1 IoU = 70/130 = 0.538 > 0.52 -> suppressed; continuous IoU = 54/108 = 0.5 -> kept
    assert nms(boxes, scores, same, 0.52, plus_one=True).tolist() == [0]
    assert nms(boxes, scores, same, 0.52, plus_one=False).tolist() == [0, 1]
    # different labels never suppress each other
    assert nms(boxes, scores, torch.tensor([0, 1]), 0.1, plus_one=True).tolist() == [0, 1]
    assert nms(boxes[:0], scores[:0], same[:0], 0.5).numel() == 0
