"""Helpers shared by the converters. A file record is a small picklable dict that writer processes turn into a
sample with ``build_from_file``, which copies the image bytes as they are, never re-encoded."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from .schema import ConversionError, Where

_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"))


def image_ext(data: bytes, path: str = "") -> str:
    """Extension that matches the bytes (a PNG named .jpg is stored as .png); falls back to the file name."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext or "jpg")


def xywh_to_xyxy(b, where: Where, field: str) -> list:
    """COCO [x, y, w, h] → [x1, y1, x2, y2] with the continuous convention x2 = x + w (not the official x+w-1)."""
    if not (isinstance(b, (list, tuple)) and len(b) == 4):
        raise where.error("bad_field", field, f"bbox must be [x, y, w, h], got {b!r}")
    x, y, w, h = b
    return [x, y, x + w, y + h]


def load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError("missing_file", path, "-", "-", "annotation file not found") from None
    except ValueError as e:
        raise ConversionError("bad_json", path, "-", "-", f"invalid json: {e}") from None


def load_listed_json(path: str, keys: tuple, what: str) -> dict:
    data = load_json(path)
    for key in keys:
        if not isinstance(data.get(key), list):
            raise ConversionError("bad_field", path, "-", key, f"{what} needs a list here")
    return data


def annotations_by_image(ann_file: str, data: dict, on_error: str, skipped: dict) -> dict:
    """{image id: its annotations}; an annotation of an image not in ``images`` is an error or skipped."""
    image_ids = {im.get("id") for im in data["images"]}
    by_image = {}
    for a in data["annotations"]:
        if a.get("image_id") not in image_ids:
            skip_or_raise(ConversionError("unknown_image", ann_file, f"annotation id {a.get('id')}", "image_id",
                                          f"image id {a.get('image_id')!r} is not in 'images'"), on_error, skipped)
            continue
        by_image.setdefault(a["image_id"], []).append(a)
    return by_image


def file_record(rid, image_path: str, rec: dict, where: Where) -> dict:
    return {"id": str(rid), "image_path": image_path, "json": rec,
            "where": {"file": where.file, "record": where.record, "box_fields": where.box_fields,
                      "image_field": where.image_field}}


def add_size_hints(records: list, threads: int = 32) -> None:
    """``size_hint`` = image file size (stat in parallel threads: slow file systems make a serial stat crawl)."""
    def size(r):
        try:
            return os.path.getsize(r["image_path"])
        except OSError:
            return 0

    with ThreadPoolExecutor(threads) as pool:
        for r, s in zip(records, pool.map(size, records, chunksize=256)):
            r["size_hint"] = s + 512


def build_from_file(record: dict):
    where = Where(**record["where"])
    path = record["image_path"]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise where.error("missing_image", where.image_field, f"cannot read image: {e.strerror or e}",
                          file=path) from None
    rec = json.loads(json.dumps(record["json"]))  # a private copy: validation edits boxes in place
    return rec, data, image_ext(data, path), where, path


def skip_or_raise(err: ConversionError, on_error: str, skipped: dict) -> None:
    if on_error != "skip":
        raise err
    skipped.setdefault(err.code, []).append(str(err.record))


def resolve_image(images_dir: Optional[str], file_name: str) -> str:
    return file_name if images_dir is None or os.path.isabs(file_name) else os.path.join(images_dir, file_name)


def typed_errors(fn):
    """A wrong type deep inside untrusted json (``"bbox": "abc"``) becomes a ``ConversionError`` naming the file."""
    import functools

    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        try:
            return fn(path, *args, **kwargs)
        except ConversionError:
            raise
        except (TypeError, AttributeError, KeyError, IndexError, ValueError, OverflowError, RecursionError) as e:
            raise ConversionError("malformed", path, "-", "-",
                                  f"malformed input ({type(e).__name__}: {e})") from None

    return wrapper

