"""Synthetic scenes: deterministic, spans and relations true to the drawing, fast, and written by the CLI."""

import hashlib
import os
import re

import numpy as np

from glip_pl.data import iter_samples
from glip_pl.data.synthetic import CATEGORIES, COLOURS, SHAPES, SyntheticConfig, make_scene, render, synthetic_sample

NAMES = {c["id"]: c["name"] for c in CATEGORIES}


def test_categories_are_colour_shape_names():
    assert len(CATEGORIES) == len(COLOURS) * len(SHAPES) == 12
    assert NAMES[1] == "red circle" and all(" " in n for n in NAMES.values())


def test_scene_is_a_pure_function_of_seed_split_index():
    a = synthetic_sample("grounding", 3, "train", 7)
    b = synthetic_sample("grounding", 3, "train", 7)
    assert a[0] == b[0] and a[1] == b[1]
    assert synthetic_sample("grounding", 3, "val", 7)[1] != a[1]
    assert synthetic_sample("grounding", 4, "train", 7)[1] != a[1]
    # the three flavours show the same scene; caption keeps the truth hidden
    det, cap = synthetic_sample("detection", 3, "train", 7)[0], synthetic_sample("caption", 3, "train", 7)[0]
    assert det["boxes"] == a[0]["boxes"] and det["category_ids"] == a[0]["category_ids"]
    assert cap["boxes"] == [] and cap["hidden"]["boxes"] == a[0]["boxes"] and cap["caption"] == a[0]["caption"]


def test_spans_name_the_boxes_and_relations_are_true():
    for i in range(200):
        rec = synthetic_sample("grounding", 0, "train", i)[0]
        cap, boxes = rec["caption"], rec["boxes"]
        assert 1 <= len(boxes) <= 4
        for b, spans, cat in zip(boxes, rec["spans"], rec["category_ids"]):
            assert [cap[s:e] for s, e in spans] == [NAMES[cat]]
            assert 0 <= b[0] < b[2] <= 256 and 0 <= b[1] < b[3] <= 256
        centre = {NAMES[c]: ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b, c in zip(boxes, rec["category_ids"])}
        for a, rel, b in re.findall(r"a (\w+ \w+) (left of|right of|above|below) a (\w+ \w+)", cap):
            (ax, ay), (bx, by) = centre[a], centre[b]
            assert {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel], cap


def test_boxes_are_tight_around_the_drawn_shapes():
    cfg = SyntheticConfig(noise=0, colour_jitter=0)
    for i in range(20):
        scene = make_scene(1, "train", i, cfg)
        img = np.asarray(render(scene, cfg)).astype(int)
        for cat, (x1, y1, x2, y2) in scene["objects"]:
            colour = np.array(list(COLOURS.values())[(cat - 1) % 4])
            inside = np.abs(img[y1:y2, x1:x2] - colour).sum(-1) < 10
            assert inside.any(0).all() and inside.any(1).all()  # every column and row of the box is touched
            outside = np.ones(img.shape[:2], bool)  # nothing of this colour outside the box (other boxes aside)
            for _, (a1, b1, a2, b2) in scene["objects"]:
                outside[b1:b2, a1:a2] = False
            assert not (np.abs(img - colour).sum(-1) < 10)[outside].any()


def test_a_few_hundred_samples_in_parallel(tmp_path):
    from glip_pl.data.synthetic import generate_synthetic

    res = generate_synthetic(str(tmp_path), flavours=("grounding",), splits={"train": 300}, num_workers=2,
                             progress=False)
    assert res["grounding"]["train"]["count"] == 300


def test_cli_writes_deterministic_shards(tmp_path, shards_cli):
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert shards_cli(["synthetic", "--out", str(out), "--train", "40", "--val", "8", "--flavours",
                     "detection,caption", "--samples-per-shard", "16", "--no-progress", "--workers",
                     "1" if run == "a" else "2"]) == 0
        names = sorted(os.listdir(out / "detection"))
        assert names == ["index.json", "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
        digests.append([hashlib.sha256((out / "detection" / n).read_bytes()).hexdigest() for n in names])
    assert digests[0] == digests[1]
    samples = list(iter_samples(str(tmp_path / "a" / "caption"), split="val"))
    assert len(samples) == 8 and all(s.kind == "caption" and len(s.boxes) == 0 and s.hidden for s in samples)


def test_class_subset_makes_data_without_some_concepts(tmp_path, shards_cli):
    """``--classes``: scenes hold only those categories and index.json lists only them (a gold set lacking concepts
    that captions mention); the default draws are unchanged; bad subsets are refused with the reason."""
    import json

    import pytest

    no_yellow = (1, 2, 3, 5, 6, 7, 9, 10, 11)
    cfg = SyntheticConfig(category_ids=list(no_yellow))
    assert cfg.category_ids == no_yellow and [c["id"] for c in cfg.categories] == list(no_yellow)
    seen = {c for i in range(60) for c, _ in make_scene(0, "train", i, cfg)["objects"]}
    assert seen == set(no_yellow)
    assert all("yellow" not in make_scene(0, "train", i, cfg)["caption"] for i in range(60))
    assert make_scene(0, "train", 5)["objects"] == make_scene(0, "train", 5, SyntheticConfig())["objects"]
    for bad, why in (([1, 2, 99], "distinct ids"), ([1, 1, 2, 3], "distinct ids"), ([1, 2, 3], "max_objects")):
        with pytest.raises(ValueError, match=why):
            SyntheticConfig(category_ids=bad)

    assert shards_cli(["synthetic", "--out", str(tmp_path), "--train", "16", "--val", "8", "--flavours", "detection",
                       "--classes", ",".join(map(str, no_yellow)), "--no-progress", "--workers", "1"]) == 0
    index = json.loads((tmp_path / "detection" / "index.json").read_text())
    assert [c["id"] for c in index["categories"]] == list(no_yellow)
    ids = {c for s in iter_samples(str(tmp_path / "detection"), split="train") for c in s.category_ids}
    assert ids <= set(no_yellow) and len(ids) > 4


def test_appearance_options_make_a_shifted_domain(tmp_path, shards_cli):
    """``--noise / --background / --colour-jitter / --object-size / --min-objects / --max-objects``: a 'web' domain
    that differs from the gold in look (noisier or dark background, smaller and more objects) with the same classes
    and the same recorded truth; bad values are refused with the field named."""
    import json

    import pytest

    web = SyntheticConfig(noise=60, min_frac=0.08, max_frac=0.18, min_objects=2, max_objects=6)
    sides = [b[2] - b[0] for i in range(40) for _, b in make_scene(1, "train", i, web)["objects"]]
    assert min(sides) >= int(0.08 * 256) and max(sides) <= int(0.18 * 256) + 1
    counts = [len(make_scene(1, "train", i, web)["objects"]) for i in range(40)]
    assert min(counts) >= 2 and max(counts) > 4

    def background_spread(cfg):  # per-channel pixel spread of the bare background (outside every box)
        scene = make_scene(0, "train", 3, cfg)
        img = np.asarray(render(scene, cfg)).astype(float)
        bare = np.ones(img.shape[:2], bool)
        for _, (x1, y1, x2, y2) in scene["objects"]:
            bare[y1:y2, x1:x2] = False
        return img[bare].std(0).mean()

    assert background_spread(SyntheticConfig(noise=60)) > 3 * background_spread(SyntheticConfig())
    dark = SyntheticConfig(background=(20, 90))
    assert np.asarray(render(make_scene(0, "train", 3, dark), dark)).mean() < 110 < \
        np.asarray(render(make_scene(0, "train", 3))).mean()
    for kwargs, field in (({"noise": 300}, "noise"), ({"colour_jitter": -1}, "colour_jitter"),
                          ({"min_frac": 0.3, "max_frac": 0.2}, "min_frac"), ({"min_frac": 0.001}, "min_frac"),
                          ({"min_objects": 5, "max_objects": 4}, "min_objects"), ({"background": (90, 20)}, "background")):
        with pytest.raises(ValueError, match=field):
            SyntheticConfig(**kwargs)

    assert shards_cli(["synthetic", "--out", str(tmp_path), "--train", "8", "--val", "4", "--flavours", "detection",
                       "--noise", "60", "--background", "20,90", "--object-size", "0.08,0.18", "--min-objects", "2", "--max-objects", "6",
                       "--no-progress", "--workers", "1"]) == 0
    cfg = json.loads((tmp_path / "detection" / "index.json").read_text())["splits"]["train"]["options"]["config"]
    assert (cfg["noise"], cfg["min_frac"], cfg["max_frac"], cfg["min_objects"], cfg["max_objects"],
            list(cfg["background"])) == (60, 0.08, 0.18, 2, 6, [20, 90])
    for flag, bad in (("--object-size", "0.1"), ("--background", "dark"), ("--noise", "999")):
        assert shards_cli(["synthetic", "--out", str(tmp_path / "bad"), flag, bad, "--no-progress"]) == 1
