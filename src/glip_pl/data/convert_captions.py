"""``glip-pl shards captions``: image–caption pairs (CC3M, SBU, CC12M, Cap24M) → caption shards.

Two inputs:
  * a table of image paths and captions: .tsv / .csv / .jsonl / .parquet (parquet needs ``pyarrow``, imported
    only then). Columns are named by the header (``--image-col``, ``--caption-col``, optional ``--id-col``), or
    given with ``columns`` for header-less tsv/csv (the CC3M tsv is "caption<TAB>url"); image paths are relative
    to ``images_dir``;
  * img2dataset's WebDataset output (how people download these sets): a folder of ``*.tar`` with
    ``<key>.jpg`` + ``<key>.txt`` (caption) + ``<key>.json`` (url, sizes, status). Image bytes are copied as they
    are (never decoded to pixels and re-encoded); tar headers are scanned once and members read by offset.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tarfile
from typing import Optional, Sequence

from .convert_common import add_size_hints, build_from_file, file_record, image_ext, resolve_image, skip_or_raise
from .convert_common import typed_errors
from .reader import split_key
from .schema import IMAGE_EXTS, ConversionError, Where
from .writer import write_split

I2D_EXTRA = ("url", "key", "original_width", "original_height", "sha256", "exif")


def read_table(path: str, columns: Optional[Sequence[str]] = None) -> list:
    """Rows of a tsv/csv/jsonl/parquet table as dicts."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise ConversionError("missing_file", path, "-", "-", "table not found")
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading .parquet tables needs the 'pyarrow' package: pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    if ext == ".jsonl":
        rows = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise ConversionError("bad_json", path, f"line {i}", "-", f"invalid json: {e}") from None
        return rows
    if ext in (".tsv", ".csv", ".txt"):
        delim = "," if ext == ".csv" else "\t"
        with open(path, newline="") as f:
            if columns:
                return [dict(zip(columns, r)) for r in csv.reader(f, delimiter=delim) if r]
            return list(csv.DictReader(f, delimiter=delim))
    raise ConversionError("bad_format", path, "-", "-", f"unknown table format {ext!r} (tsv, csv, jsonl, parquet)")


@typed_errors
def table_records(table: str, images_dir: Optional[str], image_col: str = "image", caption_col: str = "caption",
                  id_col: Optional[str] = None, columns: Optional[Sequence[str]] = None, on_error: str = "raise",
                  source: str = "captions"):
    rows = read_table(table, columns)
    records, skipped = [], {}
    for i, row in enumerate(rows):
        rid = str(row[id_col]) if id_col and row.get(id_col) is not None else str(i)
        where = Where(file=table, record=f"row {i} (id {rid})", image_field=image_col)
        try:
            for col in (image_col, caption_col):
                if col not in row:
                    raise where.error("missing_field", col, f"no such column (have {sorted(row)})")
        except ConversionError as e:
            skip_or_raise(e, on_error, skipped)
            continue
        rec = {"id": rid, "source": source, "kind": "caption", "width": None, "height": None, "boxes": [],
               "caption": row[caption_col], "extra": {"image": row[image_col]}}
        records.append(file_record(rid, resolve_image(images_dir, str(row[image_col])), rec, where))
    return records, skipped


def _scan_tar(path: str) -> dict:
    """{key: {ext: (data offset, size)}} of a tar, from its headers only."""
    out = {}
    with tarfile.open(path, "r:") as tar:
        for m in tar.getmembers():
            if m.isfile():
                key, ext = split_key(m.name)
                out.setdefault(key, {})[ext] = (m.offset_data, m.size)
    return out


def _read_at(path: str, where: tuple) -> bytes:
    off, size = where
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(size)


def img2dataset_records(folder: str, source: str = "captions"):
    tars = sorted(glob.glob(os.path.join(folder, "*.tar")))
    if not tars:
        raise ConversionError("missing_file", folder, "-", "-", "no .tar files (img2dataset output_format webdataset)")
    records = []
    for path in tars:
        for key, members in _scan_tar(path).items():
            img = next((e for e in IMAGE_EXTS if e in members), None)
            records.append({"id": key, "tar": path, "key": key, "members": members, "image_member": img,
                            "size_hint": (members[img][1] if img else 0) + 512, "source": source})
    return records


def build_from_img2dataset(record: dict):
    """Writer build function for img2dataset samples: bytes copied by offset, caption from .txt (or .json)."""
    path, key, m = record["tar"], record["key"], record["members"]
    where = Where(file=path, record=f"key {key}", image_field=f"{key}.jpg")
    if record["image_member"] is None:
        raise where.error("missing_image", f"{key}.jpg", "sample has no image member")
    meta = json.loads(_read_at(path, m["json"])) if "json" in m else {}
    caption = _read_at(path, m["txt"]).decode("utf-8") if "txt" in m else meta.get("caption")
    data = _read_at(path, m[record["image_member"]])
    rec = {"id": key, "source": record["source"], "kind": "caption", "width": None, "height": None, "boxes": [],
           "caption": caption, "extra": {k: meta[k] for k in I2D_EXTRA if k in meta}}
    return rec, data, image_ext(data, f"x.{record['image_member']}"), where, f"{path}:{key}"


def convert_captions(out_dir: str, split: str, *, table: Optional[str] = None, images_dir: Optional[str] = None,
                     img2dataset: Optional[str] = None, image_col: str = "image", caption_col: str = "caption",
                     id_col: Optional[str] = None, columns: Optional[Sequence[str]] = None,
                     source: Optional[str] = None, on_error: str = "raise", **write_kw) -> dict:
    """Convert a caption table or an img2dataset folder; returns the split's index entry."""
    if (table is None) == (img2dataset is None):
        raise ValueError("give exactly one of table= or img2dataset=")
    source = source or os.path.basename(os.path.normpath(out_dir))
    if table is not None:
        records, skipped = table_records(table, images_dir, image_col, caption_col, id_col, columns, on_error,
                                         source)
        add_size_hints(records)
        build, src_file = build_from_file, table
        options = {"converter": "captions", "table": os.path.abspath(table), "image_col": image_col,
                   "caption_col": caption_col, "id_col": id_col, "columns": list(columns) if columns else None}
    else:
        records, skipped = img2dataset_records(img2dataset, source), {}
        build, src_file = build_from_img2dataset, img2dataset
        options = {"converter": "captions", "img2dataset": os.path.abspath(img2dataset)}
    return write_split(out_dir, split, records, build, source=source, kind="caption", source_file=src_file,
                       options=options, on_error=on_error, pre_skipped=skipped, **write_kw)
