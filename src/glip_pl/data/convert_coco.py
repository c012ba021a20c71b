"""``glip-pl shards coco``: COCO-format detection json + image folder → detection shards.

Covers COCO 2017, LVIS v1 (no ``file_name``: taken from ``coco_url``; ``neg_category_ids`` and
``not_exhaustive_category_ids`` kept in ``extra`` for evaluation), Objects365 in COCO format and the ODinW sets.
Crowd boxes (``iscrowd``) are dropped and counted in the split's options (reference §4); category ids and names are
kept as the dataset has them (index.json ``categories``). Boxes become x1, y1, x2 = x + w, y2 = y + h.
"""

from __future__ import annotations

import os
from typing import Optional

from .convert_common import (add_size_hints, annotations_by_image, build_from_file, file_record, load_listed_json,
                             resolve_image, skip_or_raise, typed_errors, xywh_to_xyxy)
from .schema import ConversionError, Where
from .writer import write_split

LVIS_IMAGE_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids")


@typed_errors
def coco_records(ann_file: str, images_dir: Optional[str], on_error: str = "raise", source: str = "coco"):
    """(records, categories, skipped {code: ids}, dropped counts) from a COCO-format json."""
    data = load_listed_json(ann_file, ("images", "annotations", "categories"), "a COCO json")
    categories = sorted(({"id": int(c["id"]), "name": c["name"]} for c in data["categories"]), key=lambda c: c["id"])
    cat_ids = {c["id"] for c in categories}
    skipped, dropped = {}, {"crowd_boxes": 0}
    by_image = annotations_by_image(ann_file, data, on_error, skipped)
    records = []
    for im in data["images"]:
        rid = im.get("id")
        file_name = im.get("file_name") or os.path.basename(im.get("coco_url") or "")
        where = Where(file=ann_file, record=f"image id {rid}")
        try:
            if rid is None or not file_name:
                raise where.error("missing_field", "id" if rid is None else "file_name", "required field is missing")
            boxes, cats, box_fields, ann_ids = [], [], [], []
            for a in by_image.get(rid, []):
                if a.get("iscrowd"):
                    dropped["crowd_boxes"] += 1
                    continue
                field = f"annotations[id={a.get('id')}].bbox"
                if a.get("category_id") not in cat_ids:
                    raise where.error("unknown_category", f"annotations[id={a.get('id')}].category_id",
                                      f"category {a.get('category_id')!r} is not in 'categories'")
                boxes.append(xywh_to_xyxy(a.get("bbox"), where, field))
                cats.append(int(a["category_id"]))
                box_fields.append(field)
                ann_ids.append(a.get("id"))
        except ConversionError as e:
            skip_or_raise(e, on_error, skipped)
            continue
        where.box_fields = box_fields
        extra = {"image_id": rid, "file_name": file_name, "ann_ids": ann_ids}
        extra.update({k: im[k] for k in LVIS_IMAGE_FIELDS if k in im})
        rec = {"id": str(rid), "source": source, "kind": "detection", "width": im.get("width"),
               "height": im.get("height"), "boxes": boxes, "category_ids": cats, "extra": extra}
        records.append(file_record(rid, resolve_image(images_dir, file_name), rec, where))
    return records, categories, skipped, dropped


def convert_coco(ann_file: str, images_dir: Optional[str], out_dir: str, split: str, *, source: Optional[str] = None,
                 on_error: str = "raise", **write_kw) -> dict:
    """Convert one COCO-format json to ``<out_dir>/<split>-%06d.tar``; returns the split's index entry."""
    source = source or os.path.basename(os.path.normpath(out_dir))
    records, categories, skipped, dropped = coco_records(ann_file, images_dir, on_error, source)
    add_size_hints(records)
    options = {"converter": "coco", "ann_file": os.path.abspath(ann_file), "dropped": dropped}
    return write_split(out_dir, split, records, build_from_file, source=source, kind="detection",
                       source_file=ann_file, categories=categories, options=options, on_error=on_error,
                       pre_skipped=skipped, **write_kw)
