"""`glip-pl evaluate coco` on a fixture: the standard table on stdout, the metrics json on disk."""

import json
import subprocess
import sys

import pytest

from glip_pl.eval.coco import METRIC_NAMES, evaluate_coco

GT = {
    "images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [100, 100, 80, 60], "area": 4800, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0},
    ],
}
DT = [
    {"image_id": 1, "category_id": 1, "bbox": [12, 11, 48, 50], "score": 0.9},
    {"image_id": 1, "category_id": 2, "bbox": [90, 100, 80, 60], "score": 0.8},
    {"image_id": 1, "category_id": 2, "bbox": [0, 0, 30, 30], "score": 0.7},
    {"image_id": 2, "category_id": 1, "bbox": [6, 5, 20, 22], "score": 0.6},
]


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "dt.json").write_text(json.dumps(DT))
    return tmp_path


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_evaluate_coco_cli_writes_metrics(files, capsys, backend):
    from glip_pl.cli import main

    out = files / "sub" / "metrics.json"
    rc = main(["evaluate", "coco", "--annotations", str(files / "gt.json"), "--detections", str(files / "dt.json"),
               "--out", str(out), "--backend", backend])
    assert rc == 0
    printed = capsys.readouterr().out
    assert sum("Average Precision" in ln for ln in printed.splitlines()) == 6
    assert sum("Average Recall" in ln for ln in printed.splitlines()) == 6
    metrics = json.loads(out.read_text())
    assert list(metrics) == list(METRIC_NAMES)
    assert metrics == pytest.approx(evaluate_coco(GT, DT, verbose=False))
    assert 0 < metrics["AP"] < 1


def test_evaluate_coco_cli_per_class(files, capsys):
    from glip_pl.cli import main

    out = files / "metrics.json"
    rc = main(["evaluate", "coco", "-a", str(files / "gt.json"), "-d", str(files / "dt.json"), "-o", str(out),
               "--per-class"])
    assert rc == 0
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    ref = evaluate_coco(GT, DT, verbose=False, per_category=True)["per_category"]
    assert {int(k): v for k, v in metrics["per_category"].items()} == ref
    for cat, m in ref.items():  # one table row per category
        assert any(ln.split()[:1] == [str(cat)] and m["name"].split()[0] in ln for ln in printed.splitlines())


def test_glip_pl_entry_point(files):
    """The installed console entry (`python -m glip_pl.cli`, same as `glip-pl`) runs in a fresh process."""
    r = subprocess.run([sys.executable, "-m", "glip_pl.cli", "evaluate", "coco", "-a", str(files / "gt.json"),
                        "-d", str(files / "dt.json"), "-o", str(files / "m.json")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "maxDets=100" in r.stdout and (files / "m.json").exists()


def test_eval_package_import_boundary():
    """glip_pl.eval never imports Lightning, W&B or DeepSpeed, and torch.distributed only inside a function
    (the default gather). Reads our own import statements: third-party libraries may import what they like."""
    import ast
    from pathlib import Path

    import glip_pl.eval as pkg

    banned = ("lightning", "pytorch_lightning", "wandb", "deepspeed")
    for f in sorted(Path(pkg.__file__).parent.glob("*.py")):
        tree = ast.parse(f.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not any(n.split(".")[0] in banned for n in names), f"{f.name}: imports {names}"
            if id(node) in top:
                assert not any("distributed" in n for n in names), f"{f.name}: module-level torch.distributed import"
