"""``glip-pl odinw`` (issue 24, point 8): discover ODinW-style sets, score each with the class names as the prompt
(optionally after fine-tuning on its train split), print one table with the average, write json; a broken set is
reported and counted while the others still run.

Three small sets rendered from the synthetic generator, in the layouts ODinW ships:
  plain                       train/valid/test with Roboflow's ``_annotations.coco.json``, all 12 classes;
  renamed                     ``annotations_without_background.json`` with the classes renamed ("ruby disc", ...);
  Variant/shapes.v1-coco      a variant sub-folder, Roboflow's background category (id 0 named after the set,
                              supercategory "none") and a ``mini_val`` split (the official split for such sets).
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from glip_pl.data.synthetic import CATEGORIES, SyntheticConfig, make_scene, render

SIZE = 160  # evaluation / fine-tuning image side: small and fast, the tiny model still reads the scenes
RENAMED = {1: "ruby disc", 2: "jade disc", 5: "ruby block", 6: "jade block"}
EXPECTED_SETS = ["Variant/shapes.v1-coco", "plain", "renamed"]


def write_split(folder: Path, split_code: str, n: int, cfg: SyntheticConfig, categories: list, ann_name: str,
                seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        scene = make_scene(seed, split_code, i, cfg)
        name = f"img_{i:03d}.jpg"
        render(scene, cfg).save(folder / name, quality=92)
        images.append({"id": i, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
        for cat, (x1, y1, x2, y2) in scene["objects"]:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    (folder / ann_name).write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))


@pytest.fixture(scope="module")
def odinw_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("odinw")
    full = SyntheticConfig()
    for split, code in (("train", "train"), ("valid", "val"), ("test", "test")):
        write_split(root / "plain" / split, code, 12, full, [dict(c, supercategory="shapes") for c in CATEGORIES],
                    "_annotations.coco.json", seed=1)
    four = SyntheticConfig(category_ids=tuple(RENAMED))
    cats = [{"id": i, "name": n, "supercategory": "stones"} for i, n in RENAMED.items()]
    for split, code in (("train", "train"), ("valid", "val")):
        write_split(root / "renamed" / split, code, 12, four, cats, "annotations_without_background.json", seed=2)
    six = SyntheticConfig(category_ids=(1, 2, 3, 4, 5, 9))
    cats = [{"id": 0, "name": "Variant", "supercategory": "none"}] + [
        dict(c, supercategory="Variant") for c in CATEGORIES if c["id"] in six.category_ids]
    for split, code, n in (("train", "train", 12), ("valid", "val", 12), ("mini_val", "test", 6)):
        write_split(root / "Variant" / "shapes.v1-coco" / split, code, n, six, cats, "_annotations.coco.json", seed=3)
    return root


@pytest.fixture(scope="module")
def ckpt(pretrained_tiny):
    return pretrained_tiny[1]


def odinw(*args):
    from glip_pl.cli import main

    return main(["odinw", "--min-size", str(SIZE), "--max-size", str(SIZE), *map(str, args)])


def alone(ckpt, root, set_name, split, drop_background=False):
    """The set scored on its own through ``evaluate_model_coco`` (the reference the command must equal)."""
    from glip_pl.eval.zero_shot import evaluate_model_coco
    from glip_pl.eval.predictor import Predictor

    folder = root / set_name / split
    (ann,) = [p for p in folder.glob("*.json")]
    gt = json.loads(ann.read_text())
    if drop_background:
        gt["categories"] = [c for c in gt["categories"] if c["id"] != 0]
    predictor = Predictor.from_checkpoint(ckpt, min_size=SIZE, max_size=SIZE)
    return evaluate_model_coco(predictor, gt, image_root=str(folder), verbose=False)


def test_discovers_sets_variants_and_official_split(odinw_root):
    from glip_pl.eval.odinw import discover_sets, load_set_json, split_dir

    assert discover_sets(odinw_root) == EXPECTED_SETS
    assert split_dir(odinw_root / "plain", "official").name == "valid"
    assert split_dir(odinw_root / "Variant/shapes.v1-coco", "official").name == "mini_val"
    assert split_dir(odinw_root / "Variant/shapes.v1-coco", "valid").name == "valid"
    data, dropped = load_set_json(odinw_root / "Variant/shapes.v1-coco/valid/_annotations.coco.json")
    assert dropped == "Variant" and [c["id"] for c in data["categories"]] == [1, 2, 3, 4, 5, 9]
    _, dropped = load_set_json(odinw_root / "plain/valid/_annotations.coco.json")
    assert dropped is None


def test_zero_shot_table_matches_each_set_alone(odinw_root, ckpt, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert odinw("--root", odinw_root, "--ckpt", ckpt, "--out", out) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    rows = {r["set"]: r for r in res["sets"]}
    assert list(rows) == EXPECTED_SETS and res["failed"] == []
    assert {n: (r["split"], r["images"], r["classes"]) for n, r in rows.items()} == {
        "Variant/shapes.v1-coco": ("mini_val", 6, 6), "plain": ("valid", 12, 12), "renamed": ("valid", 12, 4)}
    assert rows["Variant/shapes.v1-coco"]["background_dropped"] == "Variant"
    for name, split, bg in (("plain", "valid", False), ("renamed", "valid", False),
                            ("Variant/shapes.v1-coco", "mini_val", True)):
        m = alone(ckpt, odinw_root, name, split, drop_background=bg)
        assert rows[name]["AP"] == pytest.approx(m["AP"], abs=1e-9), name
        assert rows[name]["AP50"] == pytest.approx(m["AP50"], abs=1e-9), name
    assert rows["plain"]["AP"] > 0.05  # a trained model: the equality above compares real numbers, not zeros
    mean = sum(r["AP"] for r in rows.values()) / 3
    assert res["average"]["AP"] == pytest.approx(mean) and res["average"]["sets"] == 3
    assert f"{100 * mean:7.2f}" in printed.splitlines()[-2] and "average (3 sets)" in printed
    for name in EXPECTED_SETS:
        assert any(line.startswith(name) for line in printed.splitlines())


def test_sets_and_split_options(odinw_root, ckpt, tmp_path):
    out = tmp_path / "r.json"
    assert odinw("--root", odinw_root, "--ckpt", ckpt, "--sets", "Variant/shapes.v1-coco", "--split", "valid",
                 "--out", out) == 0
    res = json.loads(out.read_text())
    assert [(r["set"], r["split"], r["images"]) for r in res["sets"]] == [("Variant/shapes.v1-coco", "valid", 12)]
    assert odinw("--root", odinw_root, "--ckpt", ckpt, "--sets", "nope") == 2
    assert odinw("--root", odinw_root, "--ckpt", tmp_path / "none.ckpt") == 2
    assert odinw("--root", tmp_path / "nowhere", "--ckpt", ckpt) == 2


def test_broken_sets_are_reported_and_the_others_complete(odinw_root, ckpt, tmp_path, capsys):
    root = tmp_path / "odinw"
    shutil.copytree(odinw_root, root)
    shutil.copytree(root / "renamed", root / "bad_json")
    (root / "bad_json/valid/annotations_without_background.json").write_text('{"images": [')
    shutil.copytree(root / "plain", root / "missing_images")
    (root / "missing_images/valid/img_003.jpg").unlink()
    out = tmp_path / "results.json"
    assert odinw("--root", root, "--ckpt", ckpt, "--out", out) == 1
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert [r["set"] for r in res["sets"]] == EXPECTED_SETS
    failed = {f["set"]: f["error"] for f in res["failed"]}
    assert set(failed) == {"bad_json", "missing_images"}
    assert "annotations_without_background.json" in failed["bad_json"] and "not valid json" in failed["bad_json"]
    assert "image id 3" in failed["missing_images"] and "img_003.jpg" in failed["missing_images"]
    assert "average (3 sets, 2 failed)" in printed and "FAILED" in printed
    plain = alone(ckpt, odinw_root, "plain", "valid")
    assert next(r for r in res["sets"] if r["set"] == "plain")["AP"] == pytest.approx(plain["AP"], abs=1e-9)


def test_background_box_is_a_clear_error(tmp_path):
    from glip_pl.eval.odinw import OdinwError, load_set_json

    ann = tmp_path / "_annotations.coco.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [
        {"id": 0, "name": "x", "supercategory": "none"}, {"id": 1, "name": "y", "supercategory": "x"}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 0, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(OdinwError, match=r"annotation id 7: field 'category_id'"):
        load_set_json(ann)


def test_finetune_one_set_then_evaluate(odinw_root, ckpt, tmp_path):
    """One set fine-tuned with the official recipe plus a 2-step CPU override, then scored from its checkpoint."""
    recipe = Path(__file__).resolve().parents[2] / "recipes/finetune/odinw_custom.yaml"
    override = tmp_path / "two_steps.yaml"
    override.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "max_epochs": 1, "logger": False,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": "runs/elsewhere", "save_last": True, "save_top_k": 0}}]},
        "model": {"preset": "tiny", "model_options": {"official_compat": False}, "schedule": "constant",
                  "lr": 1e-3, "lang_lr": 1e-3},
        "data": {"batch_size": 2, "num_workers": 0, "train_min_sizes": [SIZE], "train_max_size": SIZE,
                 "val_size": SIZE, "val_max_size": SIZE}}))
    work, out = tmp_path / "work", tmp_path / "ft.json"
    assert odinw("--root", odinw_root, "--ckpt", ckpt, "--sets", "Variant/shapes.v1-coco", "--finetune", recipe,
                 "--finetune", override, "--work-dir", work, "--out", out) == 0, (work / "Variant_shapes.v1-coco/fit.log")
    res = json.loads(out.read_text())
    (row,) = res["sets"]
    tuned = Path(row["checkpoint"])
    assert tuned == (work / "Variant_shapes.v1-coco" / "checkpoints" / "last.ckpt").resolve()  # its own folder, not the recipe's
    state = torch.load(tuned, weights_only=True)
    assert state["global_step"] == 2
    start = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any(not torch.equal(start[k], v) for k, v in state["state_dict"].items())
    index = json.loads((work / "Variant_shapes.v1-coco/shards/index.json").read_text())
    assert [c["id"] for c in index["categories"]] == [1, 2, 3, 4, 5, 9]  # no background class
    m = alone(tuned, odinw_root, "Variant/shapes.v1-coco", "mini_val", drop_background=True)
    assert row["AP"] == pytest.approx(m["AP"], abs=1e-9) and row["split"] == "mini_val"
