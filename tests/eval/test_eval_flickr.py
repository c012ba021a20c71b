"""Flickr30k Entities recall on a hand-made example whose answers are known."""

import json

import pytest
import torch

from glip_pl.eval.flickr import FlickrEvaluator, FlickrGroundTruth, box_iou_np, evaluate_flickr
from glip_pl.model.types import Detections

BAD = [400.0, 400.0, 420.0, 420.0]  # matches nothing


def flickr_gt():
    c1 = "A man in a red shirt holds a dog."
    c2 = "Two kids play."
    c3 = "An old bicycle."
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 300, "width": 300, "caption": c1,
         "tokens_positive_eval": [[[0, 5]], [[9, 20]], [[27, 32]]], "phrase_types": ["people", "clothing", "animals"]},
        {"id": 2, "file_name": "b.jpg", "height": 300, "width": 300, "caption": c2,
         "tokens_positive_eval": [[[0, 8]], [[9, 13]]], "phrase_types": ["people", "other"]},
        {"id": 3, "file_name": "b.jpg", "height": 300, "width": 300, "caption": c3,
         "tokens_positive_eval": [[[0, 14]]]},
    ]
    anns = [
        {"id": 1, "image_id": 1, "bbox": [10, 10, 100, 200], "tokens_positive": [[0, 5]]},
        {"id": 2, "image_id": 1, "bbox": [20, 50, 60, 60], "tokens_positive": [[9, 20]]},
        {"id": 3, "image_id": 1, "bbox": [150, 100, 50, 40], "tokens_positive": [[27, 32]]},
        {"id": 4, "image_id": 1, "bbox": [220, 120, 40, 30], "tokens_positive": [[27, 32]]},  # separate GT
        {"id": 5, "image_id": 2, "bbox": [0, 0, 50, 80], "tokens_positive": [[0, 8]]},  # "play" has no box
        {"id": 6, "image_id": 3, "bbox": [100, 100, 80, 60], "tokens_positive": [[3, 14]],  # overlap fallback
         "phrase_type": "vehicles"},
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}


def predictions():
    """man: hit at rank 1; shirt: hit at rank 3; dog: hit (2nd GT box) at rank 7; kids: nothing predicted;
    bicycle: hit only at rank 11 (the upper bound)."""
    man = [[10, 12, 110, 208], BAD]
    shirt = [BAD, BAD, [22, 52, 80, 110]]
    dog = [BAD] * 6 + [[221, 121, 259, 150]]
    e1 = (man, shirt, dog)
    boxes, labels, scores = [], [], []
    for p, bs in enumerate(e1):
        for r, b in enumerate(bs):
            boxes.append(b)
            labels.append(p)
            scores.append(0.9 - 0.05 * r - 0.001 * p)
    d1 = Detections(boxes=torch.tensor(boxes), scores=torch.tensor(scores), labels=torch.tensor(labels))
    bike = [BAD] * 10 + [[100, 100, 180, 160]]
    d3 = Detections(boxes=torch.tensor(bike), scores=torch.linspace(0.9, 0.1, 11), labels=torch.zeros(11, dtype=torch.long))
    perm = torch.randperm(len(d1), generator=torch.Generator().manual_seed(0))  # order must not matter: sorted by score
    d1 = Detections(boxes=d1.boxes[perm], scores=d1.scores[perm], labels=d1.labels[perm])
    return {1: d1, 3: d3}


EXPECTED = {
    "Recall@1_all": 1 / 5, "Recall@5_all": 2 / 5, "Recall@10_all": 3 / 5, "Upper_bound_all": 4 / 5,
    "Recall@1_people": 1 / 2, "Upper_bound_people": 1 / 2,
    "Recall@1_clothing": 0.0, "Recall@5_clothing": 1.0,
    "Recall@5_animals": 0.0, "Recall@10_animals": 1.0,
    "Recall@10_vehicles": 0.0, "Upper_bound_vehicles": 1.0,
}


def test_known_recalls():
    m = evaluate_flickr(flickr_gt(), predictions(), verbose=False)
    assert m["num_phrases"] == 5  # "play" has no box: not scored
    for k, v in EXPECTED.items():
        assert m[k] == pytest.approx(v), k
    assert "Recall@1_other" not in m


def test_box_lists_and_accumulator(tmp_path):
    gt = FlickrGroundTruth(flickr_gt())
    assert gt.prompt(1).names == ["A man", "a red shirt", "a dog"]
    ev = FlickrEvaluator(gt, gather_fn=lambda o: [o], verbose=False)
    preds = predictions()
    ev.update([1, 3, 1], [preds[1], preds[3], preds[3]])  # a repeated entry keeps its first result
    got = ev.compute()
    assert got == evaluate_flickr(gt, preds, verbose=False)
    # the CLI/file form: per phrase, boxes best first
    as_lists = {1: [[b for b in [[10, 12, 110, 208]]], [BAD, BAD, [22, 52, 80, 110]], [BAD] * 6 + [[221, 121, 259, 150]]],
                3: [[BAD] * 10 + [[100, 100, 180, 160]]]}
    assert evaluate_flickr(gt, as_lists, verbose=False) == got

    from glip_pl.cli import main

    (tmp_path / "gt.json").write_text(json.dumps(flickr_gt()))
    (tmp_path / "p.json").write_text(json.dumps({str(k): v for k, v in as_lists.items()}))
    assert main(["evaluate", "flickr", "-a", str(tmp_path / "gt.json"), "-d", str(tmp_path / "p.json"),
                 "-o", str(tmp_path / "m.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["Upper_bound_all"] == pytest.approx(0.8)


def test_iou():
    assert box_iou_np([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(50 / 150)
    assert box_iou_np([[0, 0, 9, 9]], [[0, 0, 9, 9]], plus_one=True)[0, 0] == 1.0
