"""COCO-format converter: exact round trip, crowd boxes dropped, LVIS fields, and loud bad records."""

import json
import os

import pytest

from glip_pl.data import ConversionError, iter_samples
from glip_pl.data.convert_coco import convert_coco
from glip_pl.data.writer import read_index

CATS = [{"id": 7, "name": "traffic_light"}, {"id": 3, "name": "bow_(weapon)"}, {"id": 12, "name": "person"}]


def coco_fixture(root, make_image, n=5, lvis=False):
    """n images (mixed JPEG/PNG, sizes vary) with 0..3 boxes, non-integer coordinates, one crowd box."""
    images, anns = [], []
    for i in range(n):
        w, h = 40 + 8 * i, 30 + 4 * i
        name = f"img_{i}.{'png' if i % 2 else 'jpg'}"
        make_image(os.path.join(root, "images", name), w, h)
        im = {"id": 100 + i, "width": w, "height": h}
        if lvis:
            im.update(coco_url=f"http://images.cocodataset.org/train2017/{name}", neg_category_ids=[3],
                      not_exhaustive_category_ids=[])
        else:
            im["file_name"] = name
        images.append(im)
        for k in range(i % 4):
            anns.append({"id": 1000 + 10 * i + k, "image_id": 100 + i, "category_id": CATS[k % 3]["id"],
                         "bbox": [1.5 + k, 2.25, 10.5 + k, 7.75], "iscrowd": 0, "area": 1.0})
    anns.append({"id": 9999, "image_id": 101, "category_id": 12, "bbox": [0, 0, 5, 5], "iscrowd": 1})
    data = {"images": images, "annotations": anns, "categories": CATS}
    path = os.path.join(root, "ann.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, data


@pytest.mark.parametrize("lvis", [False, True])
def test_round_trip_is_exact(tmp_path, make_image, lvis):
    ann, data = coco_fixture(str(tmp_path), make_image, lvis=lvis)
    out = str(tmp_path / "shards" / "coco")
    entry = convert_coco(ann, str(tmp_path / "images"), out, "train", num_workers=1, progress=False)
    assert entry["count"] == 5 and entry["options"]["dropped"] == {"crowd_boxes": 1}
    assert read_index(out)["categories"] == sorted(CATS, key=lambda c: c["id"])
    want = {}
    for a in data["annotations"]:
        if not a["iscrowd"]:
            x, y, w, h = a["bbox"]
            want.setdefault(str(a["image_id"]), []).append(([x, y, x + w, y + h], a["category_id"]))
    got = {s.id: s for s in iter_samples(out, split="train")}
    assert set(got) == {str(im["id"]) for im in data["images"]}
    for im in data["images"]:
        s = got[str(im["id"])]
        assert (s.width, s.height, s.kind, s.source) == (im["width"], im["height"], "detection", "coco")
        assert [(b, c) for b, c in zip(s.boxes.tolist(), s.category_ids)] == want.get(s.id, [])
        if lvis:
            assert s.extra["neg_category_ids"] == [3]
        else:
            assert s.extra["file_name"] == im["file_name"]
    # the stored image bytes are the file's bytes (no re-encoding)
    import tarfile

    with tarfile.open(os.path.join(out, "train-000000.tar")) as tar:
        first = tar.extractfile(tar.getmembers()[0]).read()
    assert first == open(tmp_path / "images" / "img_0.jpg", "rb").read()


def _break(data, root, kind):
    """Make image 102 (or its annotations) bad in one way; returns the expected (code, field fragment)."""
    ann = next(a for a in data["annotations"] if a["image_id"] == 102)
    if kind == "box_outside_image":
        ann["bbox"] = [40.0, 2.0, 30.0, 5.0]  # image 102 is 56 wide: x2 = 70
        return "annotations[id=1020].bbox"
    if kind == "degenerate_box":
        ann["bbox"] = [4.0, 2.0, 0.0, 5.0]
        return "annotations[id=1020].bbox"
    if kind == "missing_image":
        os.remove(os.path.join(root, "images", "img_2.jpg"))
        return "file_name"
    if kind == "undecodable_image":
        with open(os.path.join(root, "images", "img_2.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff garbage")
        return "file_name"
    if kind == "duplicate_id":
        data["images"].append(dict(data["images"][0], id=102))  # a second record with id 102
        return "id"
    if kind == "unknown_category":
        ann["category_id"] = 99
        return "annotations[id=1020].category_id"
    if kind == "image_size_mismatch":
        data["images"][2]["width"] = 57
        return "width/height"
    raise AssertionError(kind)


ERRORS = ["box_outside_image", "degenerate_box", "missing_image", "undecodable_image", "duplicate_id",
          "unknown_category", "image_size_mismatch"]


@pytest.mark.parametrize("code", ERRORS)
def test_bad_record_names_file_record_field(tmp_path, make_image, code):
    root = str(tmp_path)
    ann, data = coco_fixture(root, make_image)
    field = _break(data, root, code)
    with open(ann, "w") as f:
        json.dump(data, f)
    with pytest.raises(ConversionError) as e:
        convert_coco(ann, f"{root}/images", f"{root}/out", "train", num_workers=1, progress=False)
    err = e.value
    assert err.code == code and field in err.field and "102" in str(err.record)
    expected_file = f"{root}/images/img_2.jpg" if code in ("missing_image", "undecodable_image") else ann
    assert err.file == expected_file and expected_file in str(err)
    if os.path.isdir(f"{root}/out"):  # nothing half-written
        assert not [n for n in os.listdir(f"{root}/out") if n.endswith(".tar") or ".tmp" in n]
    entry = convert_coco(ann, f"{root}/images", f"{root}/skip", "train", on_error="skip", num_workers=2,
                         progress=False)
    assert entry["skipped"] == {code: 1} and entry["skipped_total"] == 1
    assert entry["count"] == (5 if code == "duplicate_id" else 4)
    assert read_index(f"{root}/skip")["splits"]["train"]["skipped_ids"][code]


def test_cli_exit_code_and_message(tmp_path, make_image, shards_cli, capsys):
    root = str(tmp_path)
    ann, data = coco_fixture(root, make_image)
    _break(data, root, "box_outside_image")
    json.dump(data, open(ann, "w"))
    argv = ["coco", "--ann", ann, "--images", f"{root}/images", "--out", f"{root}/o", "--no-progress"]
    assert shards_cli(argv) == 1
    err = capsys.readouterr().err
    assert ann in err and "image id 102" in err and "annotations[id=1020].bbox" in err
    assert shards_cli(argv + ["--on-error", "skip", "--overwrite"]) == 0
    assert '"box_outside_image": 1' in capsys.readouterr().out


def test_small_overhang_is_clipped_and_counted(tmp_path, make_image):
    root = str(tmp_path)
    ann, data = coco_fixture(root, make_image)
    a = next(a for a in data["annotations"] if a["image_id"] == 102)
    a["bbox"] = [50.0, 2.0, 6.5, 5.0]  # x2 = 56.5 on a 56-wide image
    json.dump(data, open(ann, "w"))
    entry = convert_coco(ann, f"{root}/images", f"{root}/o", "train", num_workers=1, progress=False)
    assert entry["clipped_boxes"] == 1
    s = next(s for s in iter_samples(f"{root}/o") if s.id == "102")
    assert s.boxes[0].tolist() == [50.0, 2.0, 56.0, 7.0]


@pytest.mark.parametrize("flag", ["--ann", "--annotations", "-a"])
def test_every_converter_takes_the_annotation_flag_of_evaluate(tmp_path, make_image, shards_cli, flag):
    """``glip-pl evaluate`` says --annotations, the converters said --ann: all three spellings work everywhere."""
    import argparse

    from glip_pl.data.cli import register

    root = str(tmp_path)
    ann, _ = coco_fixture(root, make_image)
    assert shards_cli(["coco", flag, ann, "--images", f"{root}/images", "--out", f"{root}/o", "--no-progress"]) == 0
    assert read_index(f"{root}/o")["splits"]["train"]["count"] == 5
    parser = argparse.ArgumentParser(prog="glip-pl")
    register(parser.add_subparsers(dest="command"))
    for fmt, dest in (("grounding", "ann"), ("odvg", "jsonl")):
        args = parser.parse_args(["shards", fmt, flag, "x.json", "--out", "o"])
        assert getattr(args, dest) == "x.json", (fmt, flag)
