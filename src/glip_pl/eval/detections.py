"""Reading COCO-style json files (ground truth, detections) and validating detections before scoring them,
naming the first bad record.

pycocotools and faster-coco-eval accept almost anything and fail later with a KeyError or an assertion (or, for
NaN scores, silently mis-sort); here each record is checked against the ground truth first:
``{image_id: int (a GT image), category_id: int (a GT category), bbox: [x, y, w, h] finite with w, h >= 0,
score: finite number}``.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
from typing import Optional, Sequence

REQUIRED = ("image_id", "category_id", "bbox", "score")


class CocoEvalError(ValueError):
    """Ground truth or detections that cannot be scored; the message says which and why."""


def load_json(obj, what: str = "annotations"):
    """A path (str/PathLike) → parsed json; a dict/list passes through (deep-copied: the COCO API mutates it)."""
    if isinstance(obj, (str, os.PathLike)):
        try:
            with open(obj, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            raise CocoEvalError(f"{what}: no such file {os.fspath(obj)!r}") from None
        except json.JSONDecodeError as e:
            raise CocoEvalError(f"{what}: {os.fspath(obj)!r} is not valid json ({e})") from None
    return copy.deepcopy(obj)


class DetectionsFileError(ValueError):
    """A detections file that cannot be scored; ``index`` and ``field`` locate the first bad record."""

    def __init__(self, message: str, index: Optional[int] = None, field: Optional[str] = None):
        super().__init__(message)
        self.index = index
        self.field = field


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _as_id(v):
    """An integer id (ints, or floats with an integral value as some tools write them); None if not one."""
    if isinstance(v, bool) or not _is_number(v):
        return None
    f = float(v)
    if not math.isfinite(f) or f != int(f):
        return None
    return int(f)


def validate_detections(dets, gt: Optional[dict] = None, source: str = "detections") -> list:
    """Check every record (and, given the GT dict, its ids); return normalised copies (int ids, float box/score).

    Raises ``DetectionsFileError`` for the first bad record: its index, the field and why.
    """
    if isinstance(dets, dict):
        raise DetectionsFileError(
            f"{source}: expected a json list of detections, found an object with keys {sorted(dets)[:6]} "
            "(a COCO results file is a plain list of {image_id, category_id, bbox, score})"
        )
    if not isinstance(dets, Sequence) or isinstance(dets, (str, bytes)):
        raise DetectionsFileError(f"{source}: expected a list of detections, found {type(dets).__name__}")
    img_ids = cat_ids = None
    if gt is not None:
        img_ids = {int(im["id"]) for im in gt.get("images", [])}
        cat_ids = {int(c["id"]) for c in gt.get("categories", [])}
    out = []
    for i, d in enumerate(dets):
        where = f"{source}: record #{i}"

        def bad(field, why):
            return DetectionsFileError(f"{where}: field {field!r} {why} (record: {_short(d)})", index=i, field=field)

        if not isinstance(d, dict):
            raise DetectionsFileError(f"{where}: expected an object, found {type(d).__name__} ({_short(d)})", index=i)
        for k in REQUIRED:
            if k not in d:
                raise bad(k, "is missing")
        img = _as_id(d["image_id"])
        if img is None:
            raise bad("image_id", f"must be an integer, found {type(d['image_id']).__name__} {d['image_id']!r}")
        if img_ids is not None and img not in img_ids:
            raise bad("image_id", f"= {img} is not an image of the ground truth")
        cat = _as_id(d["category_id"])
        if cat is None:
            raise bad("category_id", f"must be an integer, found {type(d['category_id']).__name__} {d['category_id']!r}")
        if cat_ids is not None and cat not in cat_ids:
            raise bad("category_id", f"= {cat} is not a category of the ground truth")
        box = d["bbox"]
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise bad("bbox", f"must be a list of 4 numbers [x, y, w, h], found {box!r}")
        if not all(_is_number(v) for v in box):
            raise bad("bbox", f"must hold numbers, found {box!r}")
        if not all(math.isfinite(float(v)) for v in box):
            raise bad("bbox", f"holds NaN/Inf: {box!r}")
        if float(box[2]) < 0 or float(box[3]) < 0:
            raise bad("bbox", f"has a negative size (w={box[2]}, h={box[3]}); boxes are [x, y, width, height]")
        s = d["score"]
        if not _is_number(s):
            raise bad("score", f"must be a number, found {type(s).__name__} {s!r}")
        if not math.isfinite(float(s)):
            raise bad("score", f"is {float(s)} (scores must be finite)")
        rec = {"image_id": img, "category_id": cat, "bbox": [float(v) for v in box], "score": float(s)}
        out.append(rec)
    return out


def validate_detections_file(path, gt_path=None) -> list:
    """Load and validate a detections json (against a GT json when given)."""
    gt = load_json(gt_path, "ground truth") if gt_path is not None else None
    try:
        dets = load_json(path, "detections")
    except Exception as e:
        raise DetectionsFileError(str(e)) from None
    return validate_detections(dets, gt, source=str(path))


def _short(d, n: int = 120) -> str:
    s = repr(d)
    return s if len(s) <= n else s[: n - 3] + "..."


__all__ = ["CocoEvalError", "DetectionsFileError", "load_json", "validate_detections", "validate_detections_file"]
