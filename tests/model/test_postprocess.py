"""Post-processing (reference §6): phrase scores, threshold before centerness, clipping/rescaling, NMS per phrase."""

import math

import pytest
import torch

from glip_pl.model.anchors import make_anchors
from glip_pl.model.box_coder import BoxCoder
from glip_pl.model.postprocess import postprocess
from glip_pl.model.types import GLIPInputError, GroundingOutputs


def _logit(p):
    return math.log(p / (1 - p))


# Level 0: a0, a1 (overlapping, IoU 1444/1756 = .82); level 1: a2, partly outside the 120-px-wide content.
ANCHORS = torch.tensor([[10.0, 10, 50, 50], [12, 12, 52, 52], [100, 20, 140, 60]])
# token probabilities (T = 5); phrase 0 = tokens {1, 2}, phrase 1 = token {3}
PROBS = [
    [0.01, 0.9, 0.5, 0.02, 0.01],  # a0: phrase 0 mean .7, phrase 1 .02 (below .05)
    [0.01, 0.8, 0.4, 0.9, 0.01],  # a1: phrase 0 .6, phrase 1 .9
    [0.01, 0.06, 0.06, 0.04, 0.01],  # a2: phrase 0 .06 (just above .05), phrase 1 .04
]
CTR = [0.99, 0.5, 0.01]  # sigmoid(centerness) per anchor
TOKEN_MAP = torch.tensor([[0.0, 1, 1, 0, 0], [0, 0, 0, 1, 0]])


def _tiny():
    return GroundingOutputs(
        logits=torch.tensor([[[_logit(p) for p in row] for row in PROBS]]),
        box_regression=torch.zeros(1, 3, 4),
        centerness=torch.tensor([[_logit(c) for c in CTR]]),
        anchors=ANCHORS,
        level_sizes=[(1, 2), (1, 1)],
    )


def _run(outputs=None, plus_one=False, **kw):
    return postprocess(
        outputs or _tiny(), [TOKEN_MAP], [(80, 120)], [(160, 360)], BoxCoder(plus_one=plus_one), plus_one=plus_one,
        **kw,
    )


def test_tiny_example_by_hand():
    (det,) = _run(phrases=[["cat", "dog"]])
    # phrase 0: a0 sqrt(.7*.99), a1 sqrt(.6*.5) suppressed by a0 (IoU .82 > .6), a2 sqrt(.06*.01) kept although its
    # final score .024 is below .05 (threshold before centerness); phrase 1: a1 sqrt(.9*.5) kept (other phrase);
    # a0/phrase 1 (.02) and a2/phrase 1 (.04) dropped although sqrt(.02*.99) = .14 would pass after centerness.
    assert det.labels.tolist() == [0, 1, 0]
    expected = [math.sqrt(0.7 * 0.99), math.sqrt(0.9 * 0.5), math.sqrt(0.06 * 0.01)]
    assert torch.allclose(det.scores, torch.tensor(expected), atol=1e-6)
    # clip to the 80x120 content (a2: x2 140 -> 120), then rescale by (w x3, h x2) to 160x360
    want = torch.tensor([[30.0, 20, 150, 100], [36, 24, 156, 104], [300, 40, 360, 120]])
    assert torch.allclose(det.boxes, want, atol=1e-4)
    assert det.phrases == ["cat", "dog"] and len(det) == 3


def test_plus_one_clips_to_w_minus_one():
    (det,) = _run(plus_one=True)
    assert torch.allclose(det.boxes[2], torch.tensor([300.0, 40, 119 * 3, 120]), atol=1e-4)
    assert torch.allclose(det.boxes[0], torch.tensor([30.0, 20, 150, 100]), atol=1e-4)  # zero deltas -> the anchor


def test_caps_per_level_and_per_image():
    (det,) = _run(pre_nms_top_n=1)  # level 0 keeps only (a0, phrase 0), level 1 (a2, phrase 0)
    assert det.labels.tolist() == [0, 0]
    assert torch.allclose(det.scores, torch.tensor([math.sqrt(0.7 * 0.99), math.sqrt(0.06 * 0.01)]), atol=1e-6)
    (det,) = _run(detections_per_img=2)
    assert det.labels.tolist() == [0, 1]
    (det,) = _run(nms_thresh=0.9)  # IoU .82 no longer suppresses a1 for phrase 0
    assert sorted(det.labels.tolist()) == [0, 0, 0, 1]


def test_mean_over_phrase_tokens():
    # one phrase over tokens {0, 1, 4}: mean of .01, .9, .01 for a0
    (det,) = postprocess(
        _tiny(), [torch.tensor([[1.0, 1, 0, 0, 1]])], [(80, 120)], [(80, 120)], BoxCoder(), score_thresh=0.2
    )
    assert len(det) == 1 and det.labels.tolist() == [0]
    assert det.scores.item() == pytest.approx(math.sqrt((0.01 + 0.9 + 0.01) / 3 * 0.99), rel=1e-5)


def _random(seed, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    sizes = [(8, 10), (4, 5), (2, 3)]
    anchors = make_anchors(sizes, strides=(8, 16, 32), anchor_scale=3.0)
    N = anchors.shape[0]
    outputs = GroundingOutputs(
        logits=torch.randn(B, N, T, generator=g) * 2 - 1,
        box_regression=torch.randn(B, N, 4, generator=g) * 0.5,
        centerness=torch.randn(B, N, generator=g),
        anchors=anchors,
        level_sizes=sizes,
    )
    maps = [(torch.rand(p, T, generator=g) > 0.6).float() for p in (4, 2, 0)]
    for m in maps:
        if len(m):
            m[:, 0] = 1.0  # every phrase covers at least one token
    return outputs, maps


@pytest.mark.parametrize("plus_one", [False, True])
def test_batch_equals_per_image(plus_one):
    outputs, maps = _random(0)
    image_sizes = [(60, 80), (64, 70), (50, 80)]
    orig_sizes = [(120, 160), (640, 700), (100, 100)]
    kw = dict(box_coder=BoxCoder(plus_one=plus_one), plus_one=plus_one, pre_nms_top_n=40, detections_per_img=25)
    batch = postprocess(outputs, maps, image_sizes, orig_sizes, **kw)
    assert [len(d) for d in batch][2] == 0  # no phrase, no detection
    assert len(batch[0]) == 25  # the per-image cap binds
    for b in range(3):
        one = GroundingOutputs(
            logits=outputs.logits[b : b + 1], box_regression=outputs.box_regression[b : b + 1],
            centerness=outputs.centerness[b : b + 1], anchors=outputs.anchors, level_sizes=outputs.level_sizes,
        )
        (d,) = postprocess(one, maps[b : b + 1], image_sizes[b : b + 1], orig_sizes[b : b + 1], **kw)
        assert torch.equal(d.labels, batch[b].labels)
        assert torch.allclose(d.scores, batch[b].scores)
        assert torch.allclose(d.boxes, batch[b].boxes)
        assert (d.labels < maps[b].shape[0]).all()
        h, w = orig_sizes[b]
        assert (d.boxes[:, 0::2] <= w).all() and (d.boxes[:, 1::2] <= h).all() and (d.boxes >= 0).all()


def test_no_same_phrase_overlap_after_nms():
    outputs, maps = _random(1, B=1)
    (det,) = postprocess(outputs, maps[:1], [(60, 80)], [(60, 80)], BoxCoder(), nms_thresh=0.5, detections_per_img=0)
    assert len(det) > 10
    assert (det.scores[:-1] >= det.scores[1:]).all()
    from torchvision.ops import box_iou

    iou = box_iou(det.boxes, det.boxes)
    same = det.labels[:, None] == det.labels[None, :]
    off_diag = ~torch.eye(len(det), dtype=torch.bool)
    assert (iou[same & off_diag] <= 0.5 + 1e-6).all()
    assert (iou[~same] > 0.5).any()  # boxes of different phrases do overlap


def test_bad_token_maps():
    with pytest.raises(GLIPInputError, match="cover no token"):
        postprocess(_tiny(), [torch.zeros(1, 5)], [(80, 120)], [(80, 120)], BoxCoder())
    with pytest.raises(GLIPInputError, match="token maps"):
        postprocess(_tiny(), [TOKEN_MAP, TOKEN_MAP], [(80, 120)], [(80, 120)], BoxCoder())
    # a longer map is fine when the extra tokens are unused
    (det,) = postprocess(_tiny(), [torch.nn.functional.pad(TOKEN_MAP, (0, 3))], [(80, 120)], [(160, 360)], BoxCoder())
    assert det.labels.tolist() == [0, 1, 0]
