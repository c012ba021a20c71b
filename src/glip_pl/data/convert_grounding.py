"""``glip-pl shards grounding``: MDETR-style grounding json (GoldG) → grounding shards.

Reads ``final_mixed_train_no_coco.json`` / ``final_flickr_separateGT_*.json`` (reference §4): each ``images`` entry
is one caption–image pair (its own sample) with ``caption`` and optional ``tokens_positive_eval`` (kept as
``spans_eval`` for evaluation); each annotation has ``bbox`` (x, y, w, h) and ``tokens_positive`` (or ``tokens``):
the [start, end) character spans of the phrase the box grounds. Provenance fields (``dataset_name``,
``sentence_id``, ``original_img_id``, ``original_id``, ``task_id``, ``data_source``) go to ``extra``.
For the mixed set, ``data_source`` picks the image folder (``image_dirs={"coco": ..., "gqa": ...}``).
"""

from __future__ import annotations

import os
from typing import Optional

from .convert_common import (add_size_hints, annotations_by_image, build_from_file, file_record, load_listed_json,
                             resolve_image, skip_or_raise, typed_errors, xywh_to_xyxy)
from .schema import ConversionError, Where
from .writer import write_split

PROVENANCE = ("dataset_name", "sentence_id", "original_img_id", "original_id", "task_id", "data_source",
              "file_name")


def _spans(value, where: Where, field: str) -> list:
    if not isinstance(value, list):
        raise where.error("missing_span", field, f"tokens_positive must be a list of [start, end], got {value!r}")
    out = []
    for sp in value:
        if not (isinstance(sp, (list, tuple)) and len(sp) == 2):
            raise where.error("span_outside_caption", field, f"span {sp!r} is not [start, end]")
        out.append([sp[0], sp[1]])
    return out


@typed_errors
def grounding_records(ann_file: str, images_dir: Optional[str], image_dirs: Optional[dict] = None,
                      on_error: str = "raise", source: str = "grounding"):
    """(records, skipped {code: ids}, dropped counts) from an MDETR-style json."""
    data = load_listed_json(ann_file, ("images", "annotations"), "an MDETR grounding json")
    skipped, dropped = {}, {"crowd_boxes": 0}
    by_image = annotations_by_image(ann_file, data, on_error, skipped)
    records = []
    for im in data["images"]:
        rid = im.get("id")
        where = Where(file=ann_file, record=f"image id {rid}")
        try:
            if rid is None or not im.get("file_name"):
                raise where.error("missing_field", "id" if rid is None else "file_name", "required field is missing")
            boxes, spans, cats, box_fields, ann_ids = [], [], [], [], []
            for a in by_image.get(rid, []):
                if a.get("iscrowd"):
                    dropped["crowd_boxes"] += 1
                    continue
                field = f"annotations[id={a.get('id')}].bbox"
                tp = a.get("tokens_positive", a.get("tokens"))
                spans.append(_spans(tp, where, f"annotations[id={a.get('id')}].tokens_positive"))
                boxes.append(xywh_to_xyxy(a.get("bbox"), where, field))
                cats.append(a.get("category_id"))
                box_fields.append(field)
                ann_ids.append(a.get("id"))
            spans_eval = im.get("tokens_positive_eval")
            if spans_eval is not None:
                spans_eval = [_spans(p, where, f"tokens_positive_eval[{i}]") for i, p in enumerate(spans_eval)]
        except ConversionError as e:
            skip_or_raise(e, on_error, skipped)
            continue
        where.box_fields = box_fields
        folder = (image_dirs or {}).get(im.get("data_source"), images_dir)
        extra = {k: im[k] for k in PROVENANCE if k in im}
        extra["ann_ids"] = ann_ids
        if any(c is not None for c in cats):
            extra["category_ids"] = cats
        rec = {"id": str(rid), "source": source, "kind": "grounding", "width": im.get("width"),
               "height": im.get("height"), "boxes": boxes, "caption": im.get("caption"), "spans": spans,
               "extra": extra}
        if spans_eval is not None:
            rec["spans_eval"] = spans_eval
        records.append(file_record(rid, resolve_image(folder, im["file_name"]), rec, where))
    return records, skipped, dropped


def convert_grounding(ann_file: str, images_dir: Optional[str], out_dir: str, split: str, *,
                      image_dirs: Optional[dict] = None, source: Optional[str] = None, on_error: str = "raise",
                      **write_kw) -> dict:
    """Convert one MDETR-style grounding json; returns the split's index entry."""
    source = source or os.path.basename(os.path.normpath(out_dir))
    records, skipped, dropped = grounding_records(ann_file, images_dir, image_dirs, on_error, source)
    add_size_hints(records)
    options = {"converter": "grounding", "ann_file": os.path.abspath(ann_file), "dropped": dropped}
    return write_split(out_dir, split, records, build_from_file, source=source, kind="grounding",
                       source_file=ann_file, options=options, on_error=on_error, pre_skipped=skipped, **write_kw)
