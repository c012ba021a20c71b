"""End to end on a tiny model: COCO zero-shot, LVIS chunked (official protocol == backbone reuse), Flickr."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from glip_pl.eval.coco import METRIC_NAMES
from glip_pl.eval.zero_shot import evaluate_model_coco
from glip_pl.eval.flickr import evaluate_model_flickr
from glip_pl.eval.lvis import LVIS_METRICS, evaluate_model_lvis
from glip_pl.eval.predictor import Predictor

POST = dict(score_thresh=0.0)


@pytest.fixture(scope="module")
def predictor():
    from glip_pl.model import build_glip

    torch.manual_seed(0)
    return Predictor(build_glip("tiny").eval(), min_size=64, max_size=100)


def _images(tmp_path, n=2):
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        h, w = (48, 64) if i % 2 else (64, 64)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        recs.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
    return recs


def _anns(images, cat_ids, per_image=3, seed=0):
    rng = np.random.default_rng(seed)
    out, k = [], 1
    for im in images:
        for _ in range(per_image):
            x, y = rng.uniform(0, im["width"] / 2), rng.uniform(0, im["height"] / 2)
            w, h = rng.uniform(8, im["width"] / 2), rng.uniform(8, im["height"] / 2)
            out.append({"id": k, "image_id": im["id"], "category_id": int(rng.choice(cat_ids)), "bbox": [x, y, w, h],
                        "area": w * h, "iscrowd": 0})
            k += 1
    return out


def test_coco_zero_shot_run(predictor, tmp_path):
    images = _images(tmp_path)
    cats = [{"id": i, "name": n} for i, n in zip((1, 3, 8), ("person", "car", "traffic light"))]
    gt = {"images": images, "categories": cats, "annotations": _anns(images, [1, 3, 8])}
    m = evaluate_model_coco(predictor, gt, image_root=str(tmp_path), verbose=False, **POST)
    assert set(METRIC_NAMES) <= set(m)
    dets = m["detections"]
    assert dets and {d["category_id"] for d in dets} <= {1, 3, 8}
    assert all(d["bbox"][0] + d["bbox"][2] <= 64 + 1e-3 for d in dets)  # original pixels


def test_lvis_official_protocol_equals_backbone_reuse(predictor, tmp_path):
    images = _images(tmp_path)
    words = ["cup", "chair", "aerosol_can", "traffic light", "bat_(animal)", "teddy bear", "umbrella", "kite", "dog"]
    names = [f"{a} {w}" for a in ("red", "blue", "green", "small", "large", "old", "new", "tall", "wet", "dry")
             for w in words]  # 90 names: 3 official chunks of ≤ 40
    cats = [{"id": i + 1, "name": n, "frequency": "rcf"[i % 3]} for i, n in enumerate(names)]
    anns = _anns(images, [1, 2, 3, 4, 5, 6], per_image=4)
    for k, im in enumerate(images):  # large boxes: even an untrained model overlaps them now and then
        for j, c in enumerate((1, 2, 3, 4, 5, 6)):
            box = [0, 0, im["width"], im["height"]] if j % 2 else [0, 0, im["width"] / 2, im["height"]]
            anns.append({"id": 100 + 10 * k + j, "image_id": im["id"], "category_id": c, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    for im in images:
        im["neg_category_ids"], im["not_exhaustive_category_ids"] = [7, 8, 9], []
    gt = {"images": images, "categories": cats, "annotations": anns}
    kw = dict(image_root=str(tmp_path), verbose=False, fixed_ap=True, **POST)
    ref = evaluate_model_lvis(predictor, gt, chunking="official", reuse_backbone=False, **kw)
    reuse = evaluate_model_lvis(predictor, gt, chunking="official", reuse_backbone=True, **kw)
    packed = evaluate_model_lvis(predictor, gt, chunking="packed", **kw)
    assert set(LVIS_METRICS) == set(ref) == set(packed)
    assert ref["AP"] > 0
    assert reuse == pytest.approx(ref, abs=1e-6), (reuse, ref)
    assert 0 <= packed["AP"] <= 1


def test_flickr_run(predictor, tmp_path):
    images = _images(tmp_path, 1)
    c1, c2 = "a man with a hat", "the hat on a man"
    entries = [{"id": 1, "file_name": "0.png", "height": 64, "width": 64, "caption": c1,
                "tokens_positive_eval": [[[0, 5]], [[11, 16]]]},
               {"id": 2, "file_name": "0.png", "height": 64, "width": 64, "caption": c2,
                "tokens_positive_eval": [[[0, 7]], [[11, 16]]]}]
    anns = [{"id": 1, "image_id": 1, "bbox": [5, 5, 30, 50], "tokens_positive": [[0, 5]]},
            {"id": 2, "image_id": 1, "bbox": [10, 2, 15, 10], "tokens_positive": [[11, 16]]},
            {"id": 3, "image_id": 2, "bbox": [10, 2, 15, 10], "tokens_positive": [[0, 7]]},
            {"id": 4, "image_id": 2, "bbox": [5, 5, 30, 50], "tokens_positive": [[11, 16]]}]
    m = evaluate_model_flickr(predictor, {"images": entries, "annotations": anns}, image_root=str(tmp_path),
                              verbose=False, **POST)
    assert m["num_phrases"] == 4
    assert 0 <= m["Recall@1_all"] <= m["Recall@5_all"] <= m["Recall@10_all"] <= m["Upper_bound_all"] <= 1
