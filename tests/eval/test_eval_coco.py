"""COCO evaluator: the 12 numbers equal pycocotools' COCOeval on a hand-built fixture (crowd, sizes, misses)."""

import contextlib
import copy
import io
import random

import numpy as np
import pytest
import torch

from glip_pl.eval.coco import METRIC_NAMES, CocoEvaluator, detections_to_coco, evaluate_coco
from glip_pl.eval.detections import CocoEvalError
from glip_pl.model.types import Detections


def make_fixture(seed=0):
    """4 images, 3 categories (one without GT), boxes of every area range, a crowd region, noisy detections."""
    rng = random.Random(seed)
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in (1, 2, 3, 7)]
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 9, "name": "remote control"}]
    anns, dets, aid = [], [], 1
    for im in images:
        for _ in range(rng.randint(2, 5)):
            cat = rng.choice([1, 3])
            side = rng.choice([12, 20, 45, 70, 150, 260])  # small (<32²), medium, large
            x, y = rng.uniform(0, 640 - side), rng.uniform(0, 480 - side)
            w, h = side * rng.uniform(0.7, 1.3), side * rng.uniform(0.7, 1.3)
            anns.append({"id": aid, "image_id": im["id"], "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            aid += 1
            for _ in range(rng.randint(0, 3)):  # detections near the box (some good, some poor)
                j = side * rng.uniform(0.0, 0.5)
                dets.append({"image_id": im["id"], "category_id": cat if rng.random() < 0.85 else 3 - cat + 1,
                             "bbox": [x + rng.uniform(-j, j), y + rng.uniform(-j, j), w * rng.uniform(0.7, 1.3),
                                      h * rng.uniform(0.7, 1.3)], "score": rng.random()})
        for _ in range(rng.randint(0, 3)):  # false positives
            dets.append({"image_id": im["id"], "category_id": rng.choice([1, 3, 9]),
                         "bbox": [rng.uniform(0, 500), rng.uniform(0, 400), rng.uniform(5, 120), rng.uniform(5, 120)],
                         "score": rng.random()})
    # a crowd region of people on image 2 with detections inside it (ignored, not false positives)
    anns.append({"id": aid, "image_id": 2, "category_id": 1, "bbox": [300, 200, 200, 150], "area": 30000,
                 "iscrowd": 1})
    dets += [{"image_id": 2, "category_id": 1, "bbox": [310 + 30 * k, 210, 40, 60], "score": 0.3 + 0.1 * k}
             for k in range(4)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def pycocotools_stats(gt, dets, cat_ids=None):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = copy.deepcopy(gt)
        g.createIndex()
        d = g.loadRes(copy.deepcopy(dets))
        ev = COCOeval(g, d, "bbox")
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reproduces_pycocotools_exactly(backend, seed):
    gt, dets = make_fixture(seed)
    ref = pycocotools_stats(gt, dets)
    assert ref[0] > 0.05 and ref[0] < 0.95  # a fixture with something to measure
    got = evaluate_coco(gt, dets, backend=backend, verbose=False)
    assert list(got) == list(METRIC_NAMES)
    vals = [got[k] for k in METRIC_NAMES]
    if backend == "pycocotools":
        np.testing.assert_array_equal(vals, ref)  # bit for bit
    else:  # the C++ accumulation sums in another order: equal to the last bit or two of a mean
        np.testing.assert_allclose(vals, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
@pytest.mark.parametrize("seed", [0, 1])
def test_per_category_ap_equals_a_one_category_evaluation(backend, seed):
    """``per_category``: each category's AP / AP50 / AP75 equal pycocotools run on that category alone; a category
    without ground truth has None; the 12 overall numbers are unchanged."""
    from glip_pl.eval.coco import format_per_category

    gt, dets = make_fixture(seed)
    got = evaluate_coco(gt, dets, backend=backend, verbose=False, per_category=True)
    assert {k: got[k] for k in METRIC_NAMES} == pytest.approx(evaluate_coco(gt, dets, backend=backend, verbose=False))
    per = got["per_category"]
    assert list(per) == [1, 3, 9]
    for cat in (1, 3):
        ref = pycocotools_stats(gt, dets, cat_ids=[cat])
        assert [per[cat][k] for k in ("AP", "AP50", "AP75")] == pytest.approx(list(ref[:3]), abs=1e-12)
        assert per[cat]["instances"] == sum(a["category_id"] == cat and not a["iscrowd"] for a in gt["annotations"])
    assert per[9] == {"name": "remote control", "AP": None, "AP50": None, "AP75": None, "instances": 0}
    assert per[1]["AP"] != per[3]["AP"]  # the fixture tells them apart
    table = format_per_category(per).splitlines()
    assert len(table) == 4 and "person" in table[1] and table[3].split()[-4:] == ["-", "-", "-", "0"]


def test_prints_standard_table(capsys):
    gt, dets = make_fixture(0)
    evaluate_coco(gt, dets)
    out = capsys.readouterr().out.splitlines()
    table = [ln for ln in out if "Average" in ln]
    assert len(table) == 12 and "maxDets=100" in table[0] and "IoU=0.50:0.95" in table[0]


def test_no_detections_scores_zero():
    gt, _ = make_fixture(0)
    got = evaluate_coco(gt, [], verbose=False)
    assert got["AP"] == 0.0 and got["AR100"] == 0.0


def test_detections_to_coco_maps_phrases_and_boxes():
    d = Detections(boxes=torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 5.0, 8.0]]),
                   scores=torch.tensor([0.9, 0.4]), labels=torch.tensor([1, 0]))
    recs = detections_to_coco([d], [42], [7, 3])
    assert recs == [{"image_id": 42, "category_id": 3, "bbox": [10.0, 20.0, 40.0, 40.0], "score": pytest.approx(0.9)},
                    {"image_id": 42, "category_id": 7, "bbox": [0.0, 0.0, 5.0, 8.0], "score": pytest.approx(0.4)}]
    plus = detections_to_coco([d], [42], [[7, 3]], plus_one=True)  # official +1 width convention
    assert plus[0]["bbox"] == [10.0, 20.0, 41.0, 41.0]
    with pytest.raises(CocoEvalError, match="phrase label 1"):
        detections_to_coco([d], [42], [[7]])


def _as_model_dets(gt, dets, cat_order):
    """Group COCO records per image into Detections with phrase labels = index in cat_order."""
    out = {}
    for im in gt["images"]:
        mine = [d for d in dets if d["image_id"] == im["id"]]
        b = torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                          for d in mine], dtype=torch.float64).reshape(-1, 4)
        out[im["id"]] = Detections(boxes=b, scores=torch.tensor([d["score"] for d in mine], dtype=torch.float64),
                                   labels=torch.tensor([cat_order.index(d["category_id"]) for d in mine]))
    return out


def test_evaluator_dedups_across_ranks_and_equals_one_shot():
    """Two simulated ranks with a padded (repeated) image: each image is scored once, same as all at once."""
    gt, dets = make_fixture(1)
    order = [1, 3, 9]
    per_img = _as_model_dets(gt, dets, order)
    ids = sorted(per_img)
    rank0 = CocoEvaluator(gt)
    rank1 = CocoEvaluator(gt)
    rank0.update(ids[:2], [per_img[i] for i in ids[:2]], order)
    rank1.update(ids[2:] + ids[:1], [per_img[i] for i in ids[2:] + ids[:1]], [order] * 3)  # sampler padding
    rank0.update(ids[:1], [per_img[ids[0]]], order)  # a repeat on the same rank
    assert rank0.duplicates == 1 and rank0.num_images == 2

    stores = [rank0._images.store, rank1._images.store]
    rank0._images.gather_fn = lambda obj: stores  # what gather_object hands rank 0
    rank1._images.gather_fn = lambda obj: None  # the other ranks get nothing and return at once
    assert rank1.compute() == {}
    got = rank0.compute()
    ref = evaluate_coco(gt, dets, verbose=False)
    for k in METRIC_NAMES:
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k


def test_evaluator_only_seen_images():
    gt, dets = make_fixture(2)
    order = [1, 3, 9]
    per_img = _as_model_dets(gt, dets, order)
    ev = CocoEvaluator(gt)
    ev.update([1], [per_img[1]], order)
    part = ev.compute()
    ref = evaluate_coco(gt, [d for d in dets if d["image_id"] == 1], img_ids=[1], verbose=False)
    assert part == pytest.approx(ref)
    with pytest.raises(CocoEvalError, match="no image"):
        CocoEvaluator(gt).compute()


def test_prompt_override_and_templates():
    """ODinW style: class names overridden, and a template per class where only the name is the phrase."""
    from glip_pl.eval.category_prompts import category_prompt_names, templated_prompt

    gt, _ = make_fixture(0)
    ids, names = category_prompt_names(gt, override={3: "automobile", "remote control": "remote"})
    assert ids == [1, 3, 9] and names == ["person", "automobile", "remote"]
    p = templated_prompt(names, ["a photo of a {}", None, "{} on a table"])
    assert p.caption == "a photo of a person. automobile. remote on a table"
    assert [p.caption[s:e] for (s, e), in p.spans] == names
    with pytest.raises(CocoEvalError, match="exactly one"):
        templated_prompt(names, ["no slot", None, None])


def test_templated_chunks_keep_templates(tokenizer):
    from glip_pl.eval.chunked import caption_tokens
    from glip_pl.eval.category_prompts import templated_chunks

    names = [f"thing number {i}" for i in range(50)]
    templates = ["a photo of a {} on the table"] * 50
    chunks = templated_chunks(names, templates, tokenizer, max_len=256)
    assert len(chunks) > 1 and [i for c in chunks for i in c.index] == list(range(50))
    for c in chunks:
        assert caption_tokens(tokenizer, c.prompt.caption) <= 256
        assert c.prompt.caption.count("a photo of a") == len(c)
        assert [c.prompt.caption[s:e] for (s, e), in c.prompt.spans] == [names[i] for i in c.index]
    (one,) = templated_chunks(names[:3], None, tokenizer)
    assert one.prompt.caption == "thing number 0. thing number 1. thing number 2"


def _two_rank_compute(rank: int, port: int, out_dir: str):
    """One of two gloo ranks: each updates its half (plus a padded repeat) and computes with the default gather."""
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        gt, _ = make_fixture(1)
        order = [1, 3, 9]
        per_img = _as_model_dets(gt, make_fixture(1)[1], order)
        ids = sorted(per_img)
        mine = ids[:2] if rank == 0 else ids[2:] + ids[:1]
        ev = CocoEvaluator(gt)
        ev.update(mine, [per_img[i] for i in mine], order)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(ev.compute(), f)
    finally:
        dist.destroy_process_group()


def test_evaluator_gathers_real_ranks_to_rank0(tmp_path):
    """Two real gloo processes: rank 0 scores every image once (equal to one shot), rank 1 gets {} (the default
    gather is ``glip_pl.distributed.gather_on_rank0``)."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_compute, args=(port, str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    gt, dets = make_fixture(1)
    ref = evaluate_coco(gt, dets, verbose=False)
    assert got[1] == {}
    for k in METRIC_NAMES:
        assert got[0][k] == pytest.approx(ref[k], abs=1e-9), k
