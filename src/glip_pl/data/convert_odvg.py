"""``glip-pl shards odvg``: ODVG jsonl (Open-GroundingDino's format) → detection or grounding shards.

One json object per line: ``filename``, ``height``, ``width`` and either
  ``detection``: {"instances": [{"bbox": [x1, y1, x2, y2], "label": int, "category": name}]} (with a label map
  json {"0": "person", ...}; without one, categories come from the instances' names), or
  ``grounding``: {"caption": str, "regions": [{"bbox": [x1, y1, x2, y2], "phrase": str,
  "tokens_positive": [[start, end], ...]}]}.
Boxes are already x1, y1, x2, y2. The sample id is the record's ``id`` when it has one, else its line number.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from .convert_common import add_size_hints, build_from_file, file_record, load_json, resolve_image, skip_or_raise
from .convert_common import typed_errors
from .schema import ConversionError, Where
from .writer import write_split


def _xyxy(b, where: Where, field: str) -> list:
    if not (isinstance(b, (list, tuple)) and len(b) == 4):
        raise where.error("bad_field", field, f"bbox must be [x1, y1, x2, y2], got {b!r}")
    return list(b)


@typed_errors
def odvg_records(jsonl: str, images_dir: Optional[str], label_map: Optional[str] = None, on_error: str = "raise",
                 source: str = "odvg"):
    """(records, kind, categories, skipped) from an ODVG jsonl file (all lines must be of one kind)."""
    names = None
    if label_map:
        names = {int(k): v for k, v in load_json(label_map).items()}
    seen_names, records, skipped, kinds = {}, [], {}, set()
    try:
        f = open(jsonl)
    except OSError as e:
        raise ConversionError("missing_file", jsonl, "-", "-", f"cannot open: {e.strerror or e}") from None
    with f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = Where(file=jsonl, record=f"line {line_no}", image_field="filename")
            try:
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise where.error("bad_json", "-", f"invalid json: {e}") from None
                rid = str(obj.get("id", line_no))
                if not obj.get("filename"):
                    raise where.error("missing_field", "filename", "required field is missing")
                rec = {"id": rid, "source": source, "width": obj.get("width"), "height": obj.get("height"),
                       "extra": {"filename": obj["filename"], "line": line_no}}
                if "detection" in obj:
                    kinds.add("detection")
                    inst = (obj["detection"] or {}).get("instances") or []
                    fields = [f"detection.instances[{i}].bbox" for i in range(len(inst))]
                    rec.update(kind="detection", boxes=[_xyxy(x.get("bbox"), where, fields[i])
                                                        for i, x in enumerate(inst)])
                    cats = []
                    for i, x in enumerate(inst):
                        lab = x.get("label")
                        if not isinstance(lab, int) or (names is not None and lab not in names):
                            raise where.error("unknown_category", f"detection.instances[{i}].label",
                                              f"label {lab!r} is not in the label map")
                        if names is None and x.get("category"):
                            seen_names.setdefault(lab, x["category"])
                        cats.append(lab)
                    rec["category_ids"] = cats
                elif "grounding" in obj:
                    kinds.add("grounding")
                    g = obj["grounding"] or {}
                    regions = g.get("regions") or []
                    fields = [f"grounding.regions[{i}].bbox" for i in range(len(regions))]
                    spans = []
                    for i, r in enumerate(regions):
                        tp = r.get("tokens_positive")
                        if not isinstance(tp, list) or not all(isinstance(s, list) and len(s) == 2 for s in tp):
                            raise where.error("missing_span", f"grounding.regions[{i}].tokens_positive",
                                              f"need a list of [start, end] spans, got {tp!r}")
                        spans.append([list(s) for s in tp])
                    rec.update(kind="grounding", caption=g.get("caption"), spans=spans,
                               boxes=[_xyxy(r.get("bbox"), where, fields[i]) for i, r in enumerate(regions)])
                    rec["extra"]["phrases"] = [r.get("phrase") for r in regions]
                else:
                    raise where.error("missing_field", "detection/grounding", "the line has neither")
            except ConversionError as e:
                skip_or_raise(e, on_error, skipped)
                continue
            where.box_fields = fields
            records.append(file_record(rid, resolve_image(images_dir, obj["filename"]), rec, where))
    if len(kinds) > 1:
        raise ConversionError("mixed_kinds", jsonl, "-", "detection/grounding",
                              "the file mixes detection and grounding lines; convert them as two sources")
    kind = kinds.pop() if kinds else "detection"
    categories = None
    if kind == "detection":
        table = names if names is not None else seen_names
        categories = [{"id": k, "name": v} for k, v in sorted(table.items())]
    return records, kind, categories, skipped


def convert_odvg(jsonl: str, images_dir: Optional[str], out_dir: str, split: str, *, label_map: Optional[str] = None,
                 source: Optional[str] = None, on_error: str = "raise", **write_kw) -> dict:
    """Convert one ODVG jsonl file; returns the split's index entry."""
    source = source or os.path.basename(os.path.normpath(out_dir))
    records, kind, categories, skipped = odvg_records(jsonl, images_dir, label_map, on_error, source)
    add_size_hints(records)
    options = {"converter": "odvg", "jsonl": os.path.abspath(jsonl),
               "label_map": os.path.abspath(label_map) if label_map else None}
    return write_split(out_dir, split, records, build_from_file, source=source, kind=kind, source_file=jsonl,
                       categories=categories, options=options, on_error=on_error, pre_skipped=skipped, **write_kw)
