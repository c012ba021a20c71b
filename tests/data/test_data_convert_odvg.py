"""ODVG jsonl converter: detection (with a label map) and grounding variants."""

import json
import os

import pytest

from glip_pl.data import ConversionError, iter_samples
from glip_pl.data.convert_odvg import convert_odvg
from glip_pl.data.writer import read_index


def _write(path, lines):
    with open(path, "w") as f:
        for obj in lines:
            f.write(json.dumps(obj) + "\n")
    return str(path)


def test_detection_round_trip_with_label_map(tmp_path, make_image):
    for i in range(3):
        make_image(tmp_path / "img" / f"{i}.jpg", 50, 40)
    lines = [{"filename": f"{i}.jpg", "height": 40, "width": 50, "detection": {"instances": [
        {"bbox": [1.5, 2.0, 30.0, 20.25], "label": i % 2, "category": ["person", "dog"][i % 2]}]}}
        for i in range(3)]
    jsonl = _write(tmp_path / "od.jsonl", lines)
    lm = tmp_path / "labels.json"
    lm.write_text(json.dumps({"0": "person", "1": "dog", "2": "cat"}))
    convert_odvg(jsonl, str(tmp_path / "img"), str(tmp_path / "out"), "train", label_map=str(lm),
                 num_workers=1, progress=False)
    assert read_index(str(tmp_path / "out"))["categories"] == [{"id": 0, "name": "person"}, {"id": 1, "name": "dog"},
                                                                 {"id": 2, "name": "cat"}]
    samples = list(iter_samples(str(tmp_path / "out")))
    assert [s.id for s in samples] == ["1", "2", "3"]  # line numbers
    assert all(s.boxes.tolist() == [[1.5, 2.0, 30.0, 20.25]] for s in samples)
    assert [s.category_ids for s in samples] == [[0], [1], [0]]


def test_grounding_round_trip_and_errors(tmp_path, make_image):
    make_image(tmp_path / "img" / "a.jpg", 64, 64)
    cap = "a cat on a mat"
    good = {"filename": "a.jpg", "height": 64, "width": 64, "grounding": {"caption": cap, "regions": [
        {"bbox": [0, 0, 10, 10], "phrase": "a cat", "tokens_positive": [[0, 5]]},
        {"bbox": [5, 30, 60, 64], "phrase": "a mat", "tokens_positive": [[9, 14]]}]}}
    outside = json.loads(json.dumps(good))
    outside["grounding"]["regions"][1]["bbox"] = [5, 30, 60, 90]
    jsonl = _write(tmp_path / "g.jsonl", [good, outside])
    with pytest.raises(ConversionError) as e:
        convert_odvg(jsonl, str(tmp_path / "img"), str(tmp_path / "out"), "train", num_workers=1, progress=False)
    assert (e.value.code, e.value.record, e.value.field) == ("box_outside_image", "line 2",
                                                             "grounding.regions[1].bbox")
    entry = convert_odvg(jsonl, str(tmp_path / "img"), str(tmp_path / "skip"), "train", on_error="skip",
                         num_workers=1, progress=False)
    assert entry["count"] == 1 and entry["skipped"] == {"box_outside_image": 1}
    (s,) = list(iter_samples(str(tmp_path / "skip")))
    assert s.kind == "grounding" and s.caption == cap and s.spans == [[(0, 5)], [(9, 14)]]
    assert s.boxes.tolist() == [[0, 0, 10, 10], [5, 30, 60, 64]] and s.extra["phrases"] == ["a cat", "a mat"]
    assert read_index(str(tmp_path / "skip"))["kind"] == "grounding"


def test_unknown_label_is_an_error(tmp_path, make_image):
    make_image(tmp_path / "img" / "0.jpg", 20, 20)
    jsonl = _write(tmp_path / "od.jsonl", [{"filename": "0.jpg", "height": 20, "width": 20, "detection": {
        "instances": [{"bbox": [1, 1, 5, 5], "label": 7}]}}])
    lm = tmp_path / "labels.json"
    lm.write_text(json.dumps({"0": "person"}))
    with pytest.raises(ConversionError) as e:
        convert_odvg(jsonl, str(tmp_path / "img"), str(tmp_path / "out"), "train", label_map=str(lm),
                     num_workers=1, progress=False)
    assert e.value.code == "unknown_category" and e.value.field == "detection.instances[0].label"
    assert os.path.basename(e.value.file) == "od.jsonl"
