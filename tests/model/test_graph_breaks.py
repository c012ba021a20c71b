"""Issue 22: the training step (model forward + loss) traces into ONE graph — no graph break, so no data-dependent
shape or host sync (``nonzero``, boolean-mask indexing, ``.item()``, a Python ``if`` on a tensor) in the model or the
criterion. Counted with ``torch._dynamo.explain`` (TorchDynamo only: no backend compiles anything, so this stays
seconds on a 2-core CPU). Before the fixed-shape loss a tiny step had 14 breaks, all in ``losses.py`` and
torchvision's ``generalized_box_iou_loss``.
"""

import torch

from glip_pl.model import build_glip, make_targets
from glip_pl.model.anchors import make_anchors
from glip_pl.model.box_coder import BoxCoder
from glip_pl.model.losses import GroundingCriterion
from glip_pl.model.prompts import build_detection_prompt, spans_to_token_map
from glip_pl.model.types import GroundingOutputs, Targets


def _breaks(explained) -> str:
    lines = []
    for b in explained.break_reasons:
        frame = b.user_stack[-1] if b.user_stack else None
        where = f"{frame.filename}:{frame.lineno}" if frame else "?"
        lines.append(f"{where}: {b.reason.splitlines()[0]}")
    return "\n".join(lines)


def _tiny_batch(model):
    """Two images of different content sizes, a 3-phrase prompt; image 0 has two boxes, image 1 none."""
    g = torch.Generator().manual_seed(0)
    h, w = 64, 96
    images = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8)
    sizes = torch.tensor([[h, w], [h - 16, w - 8]])
    prompt = build_detection_prompt(["red circle", "blue square", "green triangle"])
    text, offsets = model.tokenize([prompt.caption] * 2)
    tmap = spans_to_token_map(prompt.caption, prompt.spans, offsets[0], text.length)
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 70.0, 60.0]]), torch.zeros(0, 4)]
    targets = make_targets(boxes, [tmap[[0, 1]], tmap[[]]], text.length)
    return images, sizes, text, targets


def test_tiny_training_step_has_no_graph_break():
    torch.manual_seed(0)
    model = build_glip("tiny").train()
    batch = _tiny_batch(model)

    def step(images, sizes, text, targets):
        terms = model.loss(model(images, sizes, text), targets)
        return model.criterion.total(terms), terms

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(*batch)
    assert explained.graph_break_count == 0, _breaks(explained)
    assert explained.graph_count == 1
    loss, terms = step(*batch)  # the batch really has positives (image 0) and a box-free image
    assert terms["loss_reg"] > 0 and torch.isfinite(loss)


def test_criterion_with_ignore_regions_and_box_weights_has_no_graph_break():
    """The optional target fields (pseudo-label ignore regions, per-source box weights) add no break either."""
    g = torch.Generator().manual_seed(1)
    sizes = [(4, 6), (2, 3), (1, 2)]
    anchors = make_anchors(sizes)
    B, M, T, N = 2, 3, 8, anchors.shape[0]
    xy = torch.rand(B, M, 2, generator=g) * 30
    targets = Targets(
        boxes=torch.cat([xy, xy + 10 + torch.rand(B, M, 2, generator=g) * 20], -1),
        valid=torch.tensor([[True, True, False], [False, False, False]]),
        positive_map=(torch.rand(B, M, T, generator=g) > 0.5).float(),
        ignore_boxes=torch.tensor([[[0.0, 0.0, 20.0, 20.0]], [[5.0, 5.0, 40.0, 30.0]]]),
        ignore_valid=torch.tensor([[True], [False]]),
        ignore_map=torch.ones(B, 1, T),
        box_weight=torch.tensor([[0.5, 1.0, 1.0], [1.0, 1.0, 1.0]]),
    )
    outputs = GroundingOutputs(
        logits=torch.randn(B, N, T, generator=g), box_regression=torch.randn(B, N, 4, generator=g) * 0.3,
        centerness=torch.randn(B, N, generator=g), anchors=anchors, level_sizes=sizes,
        text_mask=torch.ones(B, T, dtype=torch.bool),
    )
    crit = GroundingCriterion(BoxCoder())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(crit)(outputs, targets)
    assert explained.graph_break_count == 0, _breaks(explained)
    assert explained.graph_count == 1
