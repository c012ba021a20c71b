"""Bad detections files stop with an error naming the first bad record (index and field); the CLI exits 2."""

import json

import pytest

from glip_pl.eval.coco import evaluate_coco
from glip_pl.eval.detections import DetectionsFileError, validate_detections

GT = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
      "categories": [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0}]}


def good(**kw):
    return {"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 30.0, 30.0], "score": 0.9, **kw}


@pytest.mark.parametrize("bad, field, words", [
    (good(image_id=99), "image_id", "not an image of the ground truth"),
    (good(category_id=3), "category_id", "not a category"),
    (good(score=float("nan")), "score", "nan"),
    (good(score=float("inf")), "score", "inf"),
    (good(score="0.9"), "score", "must be a number"),
    (good(bbox=[10, 10, -5, 30]), "bbox", "negative size"),
    (good(bbox=[10, 10, 30]), "bbox", "4 numbers"),
    (good(bbox=[10, float("nan"), 30, 30]), "bbox", "NaN"),
    (good(image_id="1"), "image_id", "must be an integer"),
    (good(image_id=1.5), "image_id", "must be an integer"),
    (good(category_id=True), "category_id", "must be an integer"),
    ({"image_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, "category_id", "missing"),
])
def test_first_bad_record_is_named(bad, field, words):
    dets = [good(), good(image_id=2, category_id=5), bad, good(image_id=12345)]
    with pytest.raises(DetectionsFileError) as e:
        validate_detections(dets, GT)
    assert e.value.index == 2 and e.value.field == field
    msg = str(e.value)
    assert "record #2" in msg and repr(field) in msg and words.lower() in msg.lower()


def test_shapes_of_the_file():
    with pytest.raises(DetectionsFileError, match="plain list"):
        validate_detections({"annotations": []}, GT)
    with pytest.raises(DetectionsFileError, match=r"record #1: expected an object"):
        validate_detections([good(), [1, 2, 3]], GT)
    ok = validate_detections([good(image_id=2.0, category_id=5)], GT)  # integral floats (some tools) are accepted
    assert ok[0]["image_id"] == 2 and isinstance(ok[0]["image_id"], int)


def test_evaluate_refuses_bad_records():
    with pytest.raises(DetectionsFileError, match="record #0"):
        evaluate_coco(GT, [good(score=float("nan"))], verbose=False)


def test_cli_reports_bad_file(tmp_path, capsys):
    from glip_pl.cli import main

    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "dt.json").write_text(json.dumps([good(), good(category_id=7)]))
    rc = main(["evaluate", "coco", "--annotations", str(tmp_path / "gt.json"), "--detections", str(tmp_path / "dt.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "record #1" in err and "'category_id'" in err and "= 7" in err
    (tmp_path / "broken.json").write_text("[{")
    assert main(["evaluate", "coco", "-a", str(tmp_path / "gt.json"), "-d", str(tmp_path / "broken.json")]) == 2
    assert "not valid json" in capsys.readouterr().err
