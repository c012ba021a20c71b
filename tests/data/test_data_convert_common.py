"""The json checks the COCO and MDETR converters share: one error naming file, record and field, or a counted skip."""

import json

import pytest

from glip_pl.data import ConversionError
from glip_pl.data.convert_coco import coco_records
from glip_pl.data.convert_grounding import grounding_records

IMAGE = {"id": 1, "file_name": "a.jpg", "width": 8, "height": 6, "caption": "a cat"}
ANN = {"id": 10, "image_id": 1, "bbox": [1, 1, 2, 2], "category_id": 1, "tokens_positive": [[2, 5]]}
ORPHAN = {**ANN, "id": 11, "image_id": 99}
READERS = {"coco": lambda path, on_error: coco_records(path, None, on_error=on_error),
           "grounding": lambda path, on_error: grounding_records(path, None, on_error=on_error)}


def _write(tmp_path, **doc):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [IMAGE], "annotations": [ANN], "categories": [{"id": 1, "name": "cat"}],
                                **doc}))
    return str(path)


@pytest.mark.parametrize("reader", READERS)
def test_annotation_of_an_unknown_image_raises_or_is_skipped(tmp_path, reader):
    path = _write(tmp_path, annotations=[ANN, ORPHAN])
    with pytest.raises(ConversionError) as e:
        READERS[reader](path, "raise")
    err = e.value
    assert (err.code, err.file, err.record, err.field) == ("unknown_image", path, "annotation id 11", "image_id")
    assert "99" in err.message
    records, *rest = READERS[reader](path, "skip")
    skipped = rest[-2]
    assert skipped == {"unknown_image": ["annotation id 11"]}
    assert [r["id"] for r in records] == ["1"] and len(records[0]["json"]["boxes"]) == 1


@pytest.mark.parametrize("reader", READERS)
def test_a_top_level_field_that_is_not_a_list_names_it(tmp_path, reader):
    path = _write(tmp_path, annotations={"id": 10})
    with pytest.raises(ConversionError) as e:
        READERS[reader](path, "raise")
    assert (e.value.code, e.value.file, e.value.field) == ("bad_field", path, "annotations")
    assert "needs a list here" in e.value.message
