"""Prediction pictures: the best phrase of an object is the label on top, one box per object, labels inside the
image."""

import numpy as np
import pytest
from PIL import Image

from glip_pl.eval.draw import color_for, draw_boxes, group_objects, render

BLUE_TRIANGLE, RED_CIRCLE, GREEN_SQUARE = 0, 1, 3  # labels with clearly different palette colours


def _background(w=200, h=150):
    return Image.new("RGB", (w, h), (255, 255, 255))


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_best_label_is_the_one_visible_at_the_box_top_left(order):
    """Two overlapping boxes of different phrases: 0.9 "blue triangle" and 0.3 "red circle". The tag at the box's
    top-left shows the 0.9 label's colour whatever order the detections come in (the old drawing painted the last,
    i.e. the lowest-scoring, over it)."""
    dets = [([40, 50, 120, 130], BLUE_TRIANGLE, "blue triangle", 0.9),
            ([40, 52, 121, 128], RED_CIRCLE, "red circle", 0.3)]
    dets = [dets[i] for i in order]
    boxes, labels, texts, scores = (list(x) for x in zip(*dets))
    img = np.asarray(draw_boxes(_background(), boxes, labels, texts, scores))
    # the label background just above the best box's top-left corner (the tag sits above the box; x=41 is its
    # left padding, never text)
    y, x = 50 - 3, 41
    assert tuple(img[y, x]) == color_for(BLUE_TRIANGLE), tuple(img[y, x])
    # one box per object: the runner-up's outline (its right edge at x=121) is not drawn
    assert tuple(img[80, 121]) == (255, 255, 255)


def test_layout_paints_the_best_label_last_and_keeps_labels_inside_the_image():
    W, H = 160, 120
    boxes = [[0, 0, 60, 50], [1, 1, 59, 52], [2, 0, 61, 49],  # one object at the top-left corner, three phrases
             [120, 80, 159, 119], [121, 82, 159, 119],  # one at the bottom-right corner, long phrases
             [10, 60, 40, 100]]  # a lone one
    labels = [RED_CIRCLE, BLUE_TRIANGLE, GREEN_SQUARE, BLUE_TRIANGLE, RED_CIRCLE, GREEN_SQUARE]
    texts = ["red circle", "blue triangle", "green square", "a very long phrase for a blue triangle at the edge",
             "red circle", "green square"]
    scores = [0.35, 0.8, 0.2, 0.6, 0.55, 0.7]
    _, layout = render(_background(W, H), boxes, labels, texts, scores)
    assert layout.objects == [[1, 0, 2], [5], [3, 4]]  # by best score: 0.8, 0.7, 0.6
    by_object = {}
    for lab in layout.labels:
        x0, y0, x1, y1 = lab.rect
        assert 0 <= x0 <= x1 <= W - 1 and 0 <= y0 <= y1 <= H - 1, lab
        by_object.setdefault(lab.object, []).append(lab)
    for k, painted in by_object.items():
        best = layout.objects[k][0]
        assert painted[-1].detection == best and painted[-1].best, painted
        assert painted[-1].score == max(scores[i] for i in layout.objects[k])
    assert [lab.object for lab in layout.labels][-1] == 0  # the best object is painted last of all
    assert len(layout.labels) == len(boxes)  # the runners-up are listed in their object's tag


def test_grouping_needs_real_overlap():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 5], [50, 50, 60, 60]]
    assert group_objects(boxes, [0.9, 0.8, 0.7, 0.95]) == [[3], [0, 1], [2]]  # IoU 0.8 joins, 0.5 does not
