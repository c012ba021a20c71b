"""MDETR-style grounding converter: captions, spans, tokens_positive_eval and provenance survive exactly."""

import json
import os

import pytest

from glip_pl.data import ConversionError, iter_samples
from glip_pl.data.convert_grounding import convert_grounding

CAPTIONS = ["a man in a red shirt holds a cup", "two dogs left of a tree", "the sky"]


def mdetr_fixture(root, make_image):
    images, anns = [], []
    for i, cap in enumerate(CAPTIONS):
        name = f"g_{i}.jpg"
        src = "coco" if i == 0 else "gqa"
        make_image(os.path.join(root, src, name), 64, 48)
        images.append({"id": i, "file_name": name, "width": 64, "height": 48, "caption": cap,
                       "dataset_name": "mixed", "original_img_id": 500 + i, "data_source": src,
                       "tokens_positive_eval": [[[0, 5]]]})
    # image 0: "a man" (box 0), "a red shirt" (box 1, two spans), "a cup" twice (boxes 2, 3 share a phrase)
    spans = [[[0, 5]], [[9, 14], [15, 20]], [[27, 32]], [[27, 32]]]
    for k, sp in enumerate(spans):
        anns.append({"id": 10 + k, "image_id": 0, "bbox": [1.0 + k, 2.0, 20.5, 10.0], "tokens_positive": sp,
                     "category_id": 1, "iscrowd": 0})
    anns.append({"id": 20, "image_id": 1, "bbox": [3, 4, 5, 6], "tokens": [[0, 8]], "iscrowd": 0})
    anns.append({"id": 21, "image_id": 1, "bbox": [3, 4, 5, 6], "tokens_positive": [[0, 8]], "iscrowd": 1})
    path = os.path.join(root, "final_mixed_train_no_coco.json")
    json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}, open(path, "w"))
    return path, images, anns


def test_round_trip_spans_boxes_and_provenance(tmp_path, make_image):
    root = str(tmp_path)
    ann, images, anns = mdetr_fixture(root, make_image)
    entry = convert_grounding(ann, None, f"{root}/out", "train", image_dirs={"coco": f"{root}/coco",
                                                                           "gqa": f"{root}/gqa"},
                              num_workers=1, progress=False)
    assert entry["count"] == 3 and entry["options"]["dropped"]["crowd_boxes"] == 1
    got = {s.id: s for s in iter_samples(f"{root}/out")}
    for im in images:
        s = got[str(im["id"])]
        assert s.kind == "grounding" and s.caption == im["caption"]
        assert s.spans_eval == [[(0, 5)]]
        assert s.extra["original_img_id"] == im["original_img_id"] and s.extra["data_source"] == im["data_source"]
        mine = [a for a in anns if a["image_id"] == im["id"] and not a["iscrowd"]]
        assert s.boxes.tolist() == [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                     a["bbox"][1] + a["bbox"][3]] for a in mine]
        assert s.spans == [[tuple(x) for x in a.get("tokens_positive", a.get("tokens"))] for a in mine]
    s0 = got["0"]
    assert [[s0.caption[a:b] for a, b in sp] for sp in s0.spans] == [["a man"], ["a red", "shirt"], ["a cup"],
                                                                       ["a cup"]]


@pytest.mark.parametrize("bad,code,field", [
    ([[20, 99]], "span_outside_caption", "annotations[id=10].tokens_positive"),
    ([[5, 5]], "span_outside_caption", "annotations[id=10].tokens_positive"),
    ([], "missing_span", "annotations[id=10].tokens_positive"),
])
def test_bad_spans_fail_loudly_or_are_counted(tmp_path, make_image, bad, code, field):
    root = str(tmp_path)
    ann, images, anns = mdetr_fixture(root, make_image)
    anns[0]["tokens_positive"] = bad
    json.dump({"images": images, "annotations": anns}, open(ann, "w"))
    kw = dict(image_dirs={"coco": f"{root}/coco", "gqa": f"{root}/gqa"}, num_workers=1, progress=False)
    with pytest.raises(ConversionError) as e:
        convert_grounding(ann, None, f"{root}/out", "train", **kw)
    assert (e.value.code, e.value.field, e.value.file) == (code, field, ann) and "image id 0" in str(e.value)
    entry = convert_grounding(ann, None, f"{root}/skip", "train", on_error="skip", **kw)
    assert entry["skipped"] == {code: 1} and entry["count"] == 2


def test_bad_eval_span_is_an_error(tmp_path, make_image):
    root = str(tmp_path)
    ann, images, anns = mdetr_fixture(root, make_image)
    images[2]["tokens_positive_eval"] = [[[0, 50]]]
    json.dump({"images": images, "annotations": anns}, open(ann, "w"))
    with pytest.raises(ConversionError) as e:
        convert_grounding(ann, f"{root}/gqa", f"{root}/out", "train", image_dirs={"coco": f"{root}/coco"},
                          num_workers=1, progress=False)
    assert e.value.code == "span_outside_caption" and e.value.field == "tokens_positive_eval[0]"
