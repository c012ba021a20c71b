"""LVIS scoring rules (federated labels, frequency groups) and the Fixed-AP / standard selections."""

import random

import numpy as np
import pytest
import torch

from glip_pl.eval.lvis import LvisEvaluator, evaluate_lvis, top_per_category, top_per_image
from glip_pl.model.types import Detections


def lvis_gt():
    """3 images; cat 1 frequent, 2 common, 3 rare, 4 frequent (never annotated positive)."""
    cats = [{"id": 1, "name": "cup", "frequency": "f"}, {"id": 2, "name": "aerosol_can", "frequency": "c"},
            {"id": 3, "name": "bat_(animal)", "frequency": "r"}, {"id": 4, "name": "kite", "frequency": "f"}]
    images = [
        {"id": 10, "height": 200, "width": 300, "neg_category_ids": [4], "not_exhaustive_category_ids": []},
        {"id": 11, "height": 200, "width": 300, "neg_category_ids": [3], "not_exhaustive_category_ids": [1]},
        {"id": 12, "height": 200, "width": 300, "neg_category_ids": [1, 2], "not_exhaustive_category_ids": []},
    ]
    boxes = {10: [(1, [10, 10, 50, 40]), (2, [100, 50, 30, 60]), (3, [200, 100, 60, 60])],
             11: [(1, [20, 20, 40, 40]), (2, [150, 10, 50, 50])],
             12: [(3, [50, 50, 80, 80])]}
    anns, k = [], 1
    for img, items in boxes.items():
        for cat, b in items:
            anns.append({"id": k, "image_id": img, "category_id": cat, "bbox": b, "area": b[2] * b[3], "iscrowd": 0})
            k += 1
    return {"images": images, "annotations": anns, "categories": cats}


def perfect(gt, score=0.9):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score}
            for a in gt["annotations"]]


@pytest.mark.parametrize("fixed_ap", [True, False])
def test_perfect_detections(fixed_ap):
    gt = lvis_gt()
    m = evaluate_lvis(gt, perfect(gt), fixed_ap=fixed_ap, verbose=False)
    for k in ("AP", "AP50", "APr", "APc", "APf"):
        assert m[k] == pytest.approx(1.0), k


def test_federated_rules():
    gt = lvis_gt()
    base = perfect(gt)
    fp = {"bbox": [250, 150, 20, 20], "score": 0.95}
    # cat 4 on image 11: neither positive nor negative there → dropped, AP unchanged
    unknown = evaluate_lvis(gt, base + [{"image_id": 11, "category_id": 4, **fp}], verbose=False)
    assert unknown["AP"] == pytest.approx(1.0)
    # cat 1 on image 11: positive but not exhaustively annotated → an unmatched detection is ignored
    not_exh = evaluate_lvis(gt, base + [{"image_id": 11, "category_id": 1, **fp}], verbose=False)
    assert not_exh["AP"] == pytest.approx(1.0)
    # cat 3 on image 11: a verified negative → a real false positive (ranked first) hurts the rare AP
    neg = evaluate_lvis(gt, base + [{"image_id": 11, "category_id": 3, **fp}], verbose=False)
    assert neg["APr"] < 0.9 and neg["APc"] == pytest.approx(1.0) and neg["APf"] == pytest.approx(1.0)


def _random_dets(gt, n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img = rng.choice([10, 11, 12])
        out.append({"image_id": img, "category_id": rng.choice([1, 2, 3, 4]),
                    "bbox": [rng.uniform(0, 250), rng.uniform(0, 150), rng.uniform(5, 80), rng.uniform(5, 80)],
                    "score": round(rng.random(), 2)})  # rounded: ties exercise the stable order
    return out + perfect(gt, score=0.5)


def test_selections():
    gt = lvis_gt()
    dets = _random_dets(gt, 400)
    top = top_per_category(dets, 5)
    for c in (1, 2, 3, 4):
        mine = [d for d in dets if d["category_id"] == c]
        got = [d for d in top if d["category_id"] == c]
        assert len(got) == min(5, len(mine))
        assert min(d["score"] for d in got) >= sorted((d["score"] for d in mine), reverse=True)[len(got) - 1]
    per_img = top_per_image(dets, 7)
    assert all(sum(d["image_id"] == i for d in per_img) == 7 for i in (10, 11, 12))
    # Fixed AP with k keeps exactly the k best per category; more than k changes nothing once selected
    a = evaluate_lvis(gt, dets, topk=5, verbose=False)
    b = evaluate_lvis(gt, top, topk=10_000, verbose=False)
    assert a == b
    s1 = evaluate_lvis(gt, dets, fixed_ap=False, max_dets_per_image=7, verbose=False)
    assert s1 != evaluate_lvis(gt, dets, fixed_ap=False, verbose=False)


def _as_detections(dets, img, cat_order):
    mine = [d for d in dets if d["image_id"] == img]
    b = torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                      for d in mine], dtype=torch.float64).reshape(-1, 4)
    return Detections(boxes=b, scores=torch.tensor([d["score"] for d in mine], dtype=torch.float64),
                      labels=torch.tensor([cat_order.index(d["category_id"]) for d in mine]))


@pytest.mark.parametrize("fixed_ap", [True, False])
def test_accumulator_prunes_exactly_and_dedups(fixed_ap):
    gt = lvis_gt()
    dets = _random_dets(gt, 600, seed=3)
    order = [4, 3, 2, 1]  # label → category id
    ref = evaluate_lvis(gt, dets, fixed_ap=fixed_ap, topk=20, max_dets_per_image=50, verbose=False)
    r0 = LvisEvaluator(gt, fixed_ap=fixed_ap, topk=20, max_dets_per_image=50, prune_every=30, verbose=False)
    r1 = LvisEvaluator(gt, fixed_ap=fixed_ap, topk=20, max_dets_per_image=50, prune_every=30, verbose=False)
    r0.update([10, 11], [_as_detections(dets, i, order) for i in (10, 11)], order)
    r1.update([12, 10], [_as_detections(dets, i, order) for i in (12, 10)], [order, order])  # 10: padding repeat
    assert r1._images.duplicates == 0 and r0._rows <= 2 * 20 * 4 + 30  # pruned while accumulating (Fixed AP)
    sent = {}
    r1._images.gather_fn = lambda obj: sent.setdefault("r1", obj) and None  # a non-scoring rank gets None
    assert r1.compute() == {}
    r0._images.gather_fn = lambda obj: [obj, sent["r1"]]  # rank 0 receives both; image 10 is kept from rank 0 only
    got = r0.compute()
    assert got == pytest.approx(ref, abs=1e-12)
