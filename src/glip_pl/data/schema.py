"""The stored sample schema, its validation, and the typed errors of the data layer.

A stored sample is two tar members sharing one key: the image as encoded bytes (``.jpg``/``.png``/...) and a
``.json`` record (schema version ``SCHEMA_VERSION``, documented in ``shards/README.md``). Boxes are x1, y1, x2, y2
in pixels of the stored image with the continuous convention (x2 = x + w, so a box may end at the image width);
this differs on purpose from the official code's ``TO_REMOVE = 1`` convention (reference §4, §9.11).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

SCHEMA_VERSION = 1
KINDS = ("detection", "grounding", "caption")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
# Members that webdataset would hand to pickle (or torch.load): refused, never decoded.
PICKLE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt", "ckpt", "npz", "npy", "mp", "msgpack")


class ConversionError(ValueError):
    """A bad input record; names the file, the record and the field (``code`` is a stable error name)."""

    def __init__(self, code: str, file: str, record: Any, field: str, message: str):
        self.code, self.file, self.record, self.field, self.message = code, str(file), record, field, message
        super().__init__(f"{file}: record {record}: field '{field}': {message} [{code}]")

    def __reduce__(self):  # keep the fields when the error crosses a process boundary
        return (ConversionError, (self.code, self.file, self.record, self.field, self.message))


class ShardError(ValueError):
    """A bad shard or stored sample; names the shard, the sample key and the member/field."""

    def __init__(self, url: str, key: Any, field: str, message: str):
        self.url, self.key, self.field, self.message = str(url), key, field, message
        super().__init__(f"{url}: sample {key}: '{field}': {message}")

    def __reduce__(self):
        return (ShardError, (self.url, self.key, self.field, self.message))


@dataclass
class Where:
    """Where a record came from, for error messages (never stored)."""

    file: str
    record: Any
    box_fields: Optional[list] = None  # per box, e.g. "annotations[id=17].bbox"
    image_field: str = "file_name"

    def box(self, i: int) -> str:
        if self.box_fields and i < len(self.box_fields):
            return self.box_fields[i]
        return f"boxes[{i}]"

    def span(self, i: int) -> str:
        box = self.box(i)
        return box[: -len(".bbox")] + ".tokens_positive" if box.endswith(".bbox") else f"spans[{i}]"

    def error(self, code: str, field: str, message: str, file: Optional[str] = None) -> ConversionError:
        return ConversionError(code, file or self.file, self.record, field, message)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_record(rec: dict, where: Where, clip_tolerance: float = 1.0) -> int:
    """Check a sample record in place against its image size; returns the number of boxes clipped (those at most
    ``clip_tolerance`` pixels outside the image)."""
    for key in ("id", "source", "kind", "width", "height", "boxes"):
        if key not in rec:
            raise where.error("missing_field", key, "required field is missing")
    kind = rec["kind"]
    if kind not in KINDS:
        raise where.error("bad_field", "kind", f"{kind!r} is not one of {KINDS}")
    w, h = rec["width"], rec["height"]
    if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
        raise where.error("bad_field", "width/height", f"image size must be positive integers, got {w}x{h}")
    boxes = rec["boxes"]
    clipped = _check_boxes(boxes, w, h, clip_tolerance, where, where.box)
    n = len(boxes)
    if kind == "detection":
        cats = rec.get("category_ids")
        if not isinstance(cats, list) or len(cats) != n or not all(isinstance(c, int) for c in cats):
            raise where.error("bad_field", "category_ids", f"need one integer category id per box ({n} boxes)")
    if kind in ("grounding", "caption"):
        cap = rec.get("caption")
        if not isinstance(cap, str) or not cap.strip():
            raise where.error("empty_caption", "caption", f"caption must be non-empty text, got {cap!r}")
    if kind == "grounding":
        spans = rec.get("spans")
        if not isinstance(spans, list) or len(spans) != n:
            raise where.error("bad_field", "spans", f"need one list of character spans per box ({n} boxes)")
        for i, box_spans in enumerate(spans):
            _check_spans(box_spans, rec["caption"], where, where.span(i))
        for p, phrase_spans in enumerate(rec.get("spans_eval") or []):
            _check_spans(phrase_spans, rec["caption"], where, f"tokens_positive_eval[{p}]")
    ignore_boxes, ignore_spans = rec.get("ignore_boxes"), rec.get("ignore_spans")
    if ignore_boxes is not None or ignore_spans is not None:
        if kind != "grounding":
            raise where.error("bad_field", "ignore_boxes", f"ignore regions belong to grounding samples, not {kind!r}")
        if not isinstance(ignore_boxes, list) or not isinstance(ignore_spans, list) or \
                len(ignore_boxes) != len(ignore_spans):
            raise where.error("bad_field", "ignore_spans",
                              "ignore_boxes and ignore_spans must be lists of the same length (one span list per box)")
        clipped += _check_boxes(ignore_boxes, w, h, clip_tolerance, where, lambda i: f"ignore_boxes[{i}]")
        for i, box_spans in enumerate(ignore_spans):
            _check_spans(box_spans, rec["caption"], where, f"ignore_spans[{i}]")
    if kind == "caption" and n:
        raise where.error("bad_field", "boxes", "caption samples carry no boxes (use kind 'grounding')")
    if rec.get("scores") is not None and len(rec["scores"]) != n:
        raise where.error("bad_field", "scores", f"need one score per box ({n} boxes)")
    return clipped


def _check_boxes(boxes: list, w: int, h: int, tolerance: float, where: Where, name) -> int:
    """``name(i)``: box i's field for the error."""
    clipped = 0
    for i, b in enumerate(boxes):
        if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(_finite(v) for v in b)):
            raise where.error("bad_field", name(i), f"box must be 4 finite numbers, got {b!r}")
        x1, y1, x2, y2 = (float(v) for v in b)
        if x2 <= x1 or y2 <= y1:
            raise where.error("degenerate_box", name(i),
                              f"degenerate box x1,y1,x2,y2 = {[x1, y1, x2, y2]} (zero or negative width/height)")
        if x1 < -tolerance or y1 < -tolerance or x2 > w + tolerance or y2 > h + tolerance:
            raise where.error("box_outside_image", name(i),
                              f"box x1,y1,x2,y2 = {[x1, y1, x2, y2]} lies outside the {w}x{h} image")
        c = [min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h)]
        if c != [x1, y1, x2, y2]:
            clipped += 1
            if c[2] <= c[0] or c[3] <= c[1]:
                raise where.error("degenerate_box", name(i), f"box {[x1, y1, x2, y2]} is empty once clipped")
        boxes[i] = c
    return clipped


def _check_spans(spans, caption: str, where: Where, field: str) -> None:
    if not isinstance(spans, list) or not spans:
        raise where.error("missing_span", field, f"a box needs at least one [start, end) span, got {spans!r}")
    for sp in spans:
        ok = isinstance(sp, (list, tuple)) and len(sp) == 2 and all(isinstance(v, int) for v in sp)
        if not ok or not (0 <= sp[0] < sp[1] <= len(caption)):
            raise where.error("span_outside_caption", field,
                              f"span {sp!r} is not a non-empty [start, end) inside the caption of "
                              f"{len(caption)} characters: {caption!r}")


def probe_image(data: bytes, where: Where, path: str, verify: str = "full") -> tuple:
    """(width, height, format) of encoded image bytes, upright as ``image_io`` decodes them; ``verify="full"``
    decodes every pixel to catch truncated files, ``"header"`` only reads the header."""
    from PIL import Image

    from .image_io import oriented_size

    try:
        with Image.open(io.BytesIO(data)) as im:
            size, fmt = oriented_size(im), (im.format or "").lower()
            if verify == "full":
                im.load()
    except Exception as e:  # PIL raises many types for corrupt data
        raise where.error("undecodable_image", where.image_field, f"cannot decode image: {e}", file=path) from None
    return size[0], size[1], fmt


@dataclass
class Sample:
    """A decoded stored sample, as the pipeline stages pass it along; ``boxes`` (M, 4) in pixels of ``image``."""

    id: str
    source: str
    kind: str
    image: Any  # PIL.Image (decoded) or uint8 Tensor (3, H, W) after the transforms
    width: int
    height: int
    boxes: Tensor
    category_ids: Optional[list] = None
    caption: Optional[str] = None
    spans: Optional[list] = None
    spans_eval: Optional[list] = None
    scores: Optional[list] = None
    ignore_boxes: Optional[Tensor] = None  # (K, 4) float pixels: regions without negative loss for their spans' tokens
    ignore_spans: Optional[list] = None  # per ignore box: list of (start, end) in ``caption``
    provenance: Optional[dict] = None
    hidden: Optional[dict] = None
    extra: dict = field(default_factory=dict)
    key: str = ""
    url: str = ""
    # filled by the prompt stage
    phrase_spans: Optional[list] = None  # per phrase: list of (start, end) in ``caption``
    phrase_names: Optional[list] = None
    phrase_labels: Optional[list] = None
    box_phrases: Optional[Tensor] = None  # (M,) long
    # filled by the tokenise stage
    input_ids: Optional[Tensor] = None  # (T,) long
    phrase_map: Optional[Tensor] = None  # (P, T) float 0/1
    ignore_map: Optional[Tensor] = None  # (K, T) float 0/1, one row per ignore box
    box_weight: Optional[float] = None  # the source's box_loss_weight; None = 1
    image_size: Optional[tuple] = None  # (h, w) of the image content after the transforms
    position: Optional[tuple] = None  # (logical worker, index in the worker's raw stream)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def _span_lists(value: Optional[list]) -> Optional[list]:
    return None if value is None else [[(int(s), int(e)) for s, e in spans] for spans in value]


def sample_from_record(rec: dict, image, key: str = "", url: str = "") -> Sample:
    boxes = torch.tensor(rec.get("boxes") or [], dtype=torch.float32).reshape(-1, 4)
    spans, spans_eval = _span_lists(rec.get("spans")), _span_lists(rec.get("spans_eval"))
    ignore_boxes = rec.get("ignore_boxes")
    if ignore_boxes is not None:
        ignore_boxes = torch.tensor(ignore_boxes, dtype=torch.float32).reshape(-1, 4)
    return Sample(
        id=str(rec["id"]), source=rec.get("source", ""), kind=rec["kind"], image=image,
        width=int(rec["width"]), height=int(rec["height"]), boxes=boxes,
        category_ids=rec.get("category_ids"), caption=rec.get("caption"), spans=spans, spans_eval=spans_eval,
        scores=rec.get("scores"), ignore_boxes=ignore_boxes, ignore_spans=_span_lists(rec.get("ignore_spans")),
        provenance=rec.get("provenance"), hidden=rec.get("hidden"),
        extra=rec.get("extra") or {}, key=key, url=url,
    )
