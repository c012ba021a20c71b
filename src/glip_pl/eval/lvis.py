"""LVIS v1 box AP (AP, APr, APc, APf), standard and Fixed AP, and chunked-prompt evaluation of a model.

Protocol (reference §6, ``configs/lvis/*.yaml`` + ``evaluation/lvis/lvis_eval.py``): the 1,203 class names do not
fit one 256-token prompt, so they are split into chunks (official: 40 names, one full model pass each, 300
detections kept per pass); boxes in original pixels (x, y, x2 − x, y2 − y, no +1 here even in the official code).

* Standard AP (LVIS API): top 300 detections per image over all categories, ``max_dets=300``.
* Fixed AP (Dave et al. 2021, as MDETR/GLIP report it): no per-image limit; the top 10,000 detections *per
  category over the whole set* are kept.

Scoring uses faster-coco-eval's ``lvis_style`` mode (the LVIS rules: a detection of a category that is neither in
the image's positive nor ``neg_category_ids`` is dropped; unmatched detections of ``not_exhaustive_category_ids``
are ignored; APr/APc/APf by the category ``frequency``), with ``maxDets`` = 300 (standard) or the top-k (Fixed AP,
where a per-(image, category) cap of k never binds). The per-image (standard) and per-category (Fixed AP)
selections are done here, before scoring, as ``LVISResults(max_dets=300)`` and the Fixed-AP evaluator do.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np

from ..model.types import Detections
from .chunked import OFFICIAL_CHUNK, PromptChunk, chunk_class_names
from .coco import load_results, make_coco_gt, xyxy_to_xywh
from .detections import CocoEvalError, load_json, validate_detections
from .per_image import PerImage

FIXED_AP_TOPK = 10_000
MAX_DETS_PER_IMAGE = 300  # the official LVIS command line: *.DETECTIONS_PER_IMG 300
LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR", "ARs", "ARm", "ARl")
_FROM_FASTER = {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small", "APm": "AP_medium",
                "APl": "AP_large", "APr": "APr", "APc": "APc", "APf": "APf", "AR": "AR_all", "ARs": "AR_small",
                "ARm": "AR_medium", "ARl": "AR_large"}


# --------------------------------------------------------------------------------------------- selection


def _columns(dets) -> tuple:
    """List of records or (img, cat, box, score) arrays → arrays."""
    if isinstance(dets, tuple):
        return dets
    img = np.asarray([d["image_id"] for d in dets], dtype=np.int64)
    cat = np.asarray([d["category_id"] for d in dets], dtype=np.int64)
    box = np.asarray([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
    score = np.asarray([d["score"] for d in dets], dtype=np.float64)
    return img, cat, box, score


def _records(cols) -> list:
    img, cat, box, score = cols
    return [{"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
            for i, c, b, s in zip(img, cat, box, score)]


def _top_by_group(group: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top-``k`` scores within each group (stable: ties keep input order), in input order."""
    if group.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(score.size), -score, group))  # by group, then score desc, then position
    g = group[order]
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    rank = np.arange(g.size) - np.repeat(starts, np.diff(np.r_[starts, g.size]))
    return np.sort(order[rank < k])


def top_per_category(dets, topk: int = FIXED_AP_TOPK):
    """The Fixed-AP selection: the ``topk`` highest-scoring detections of each category over the whole set."""
    cols = _columns(dets)
    keep = _top_by_group(cols[1], cols[3], topk)
    out = tuple(c[keep] for c in cols)
    return out if isinstance(dets, tuple) else _records(out)


def top_per_image(dets, k: int = MAX_DETS_PER_IMAGE):
    """The standard LVIS selection (``LVISResults(max_dets=k)``): the ``k`` best detections of each image."""
    cols = _columns(dets)
    keep = _top_by_group(cols[0], cols[3], k)
    out = tuple(c[keep] for c in cols)
    return out if isinstance(dets, tuple) else _records(out)


# --------------------------------------------------------------------------------------------- scoring


def evaluate_lvis(gt, detections, fixed_ap: bool = True, topk: int = FIXED_AP_TOPK,
                  max_dets_per_image: int = MAX_DETS_PER_IMAGE, img_ids: Optional[Sequence] = None,
                  verbose: bool = True, print_fn: Callable = print, validate: bool = True) -> dict:
    """LVIS box metrics: AP, AP50, AP75, APs/m/l, APr/c/f, AR, ARs/m/l (floats in [0, 1]; −1 where undefined).

    gt: an LVIS v1 json path/dict (``categories[].frequency``, ``images[].neg_category_ids`` and
    ``not_exhaustive_category_ids``); detections: COCO-style records or a json path. ``fixed_ap`` selects the
    Fixed-AP protocol (top ``topk`` per category, no per-image limit), else the standard one (top
    ``max_dets_per_image`` per image).
    """
    from faster_coco_eval import COCOeval_faster

    coco_gt = make_coco_gt(gt, "faster")
    for c in coco_gt.dataset["categories"]:
        if c.get("frequency") not in ("r", "c", "f"):
            raise CocoEvalError(f"LVIS ground truth: category {c.get('id')} has no frequency 'r'/'c'/'f'")
    dets = load_json(detections, "detections") if isinstance(detections, (str, os.PathLike)) else detections
    if isinstance(dets, tuple):
        dets = _records(dets)
    if validate:
        dets = validate_detections(dets, coco_gt.dataset)
    if fixed_ap:
        dets, max_dets = top_per_category(dets, topk), topk
    else:
        dets, max_dets = top_per_image(dets, max_dets_per_image), max_dets_per_image
    coco_dt = load_results(coco_gt, dets, "faster")
    lines: list = []
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox", lvis_style=True, print_function=lines.append)
        ev.params.maxDets = [int(max_dets)]
        if img_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in img_ids})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:
        print_fn(f"LVIS bbox, {'Fixed AP (top %d per category)' % topk if fixed_ap else 'standard AP (top %d per image)' % max_dets}")
        for ln in lines:
            if ln.lstrip().startswith("Average"):
                print_fn(ln)
    stats = ev.stats_as_dict
    return {k: float(stats[v]) for k, v in _FROM_FASTER.items()}


class LvisEvaluator:
    """Accumulate detections for LVIS: keeps only what the protocol can score, so memory stays bounded.

    Fixed AP keeps at most ``topk`` detections per category (pruned as they come, exact); standard AP keeps the
    top ``max_dets_per_image`` per image. Each image id is used once (first seen); across ranks ``gather_fn`` as in
    ``CocoEvaluator``. ``update(image_ids, detections, label_to_category)``: ``Detections.labels`` index
    ``label_to_category`` (one shared list, or one per image).
    """

    def __init__(self, gt, fixed_ap: bool = True, topk: int = FIXED_AP_TOPK,
                 max_dets_per_image: int = MAX_DETS_PER_IMAGE, gather_fn: Optional[Callable] = None,
                 only_seen: bool = True, verbose: bool = True, print_fn: Callable = print, prune_every: int = 2_000_000):
        self.gt = gt if hasattr(gt, "getImgIds") else load_json(gt, "ground truth")
        self.fixed_ap, self.topk, self.max_dets = fixed_ap, topk, max_dets_per_image
        self.only_seen, self.verbose, self.print_fn = only_seen, verbose, print_fn
        self.prune_every = prune_every
        self._images = PerImage(gather_fn)  # image id → number of rows it contributed (dedup + seen set)
        self._parts: list = []
        self._rows = 0

    def update(self, image_ids: Sequence, detections: Sequence[Detections], label_to_category) -> None:
        shared = len(label_to_category) > 0 and not isinstance(label_to_category[0], (list, tuple, np.ndarray))
        for i, (img, d) in enumerate(zip(image_ids, detections)):
            img = int(img)
            if img in self._images.store:
                self._images.duplicates += 1
                continue
            cmap = np.asarray(label_to_category if shared else label_to_category[i], dtype=np.int64)
            labels = d.labels.detach().cpu().numpy().astype(np.int64)
            if labels.size and (labels.min() < 0 or labels.max() >= cmap.size):
                raise CocoEvalError(f"image {img}: labels outside the {cmap.size} categories of the map")
            cols = (np.full(labels.size, img, dtype=np.int64), cmap[labels], xyxy_to_xywh(d.boxes),
                    d.scores.detach().cpu().double().numpy())
            if not self.fixed_ap:
                cols = top_per_image(cols, self.max_dets)
            self._images.add(img, int(cols[0].size))
            self._parts.append(cols)
            self._rows += int(cols[0].size)
        if self.fixed_ap and self._rows > self.prune_every:
            self._prune()

    def _prune(self) -> None:
        cols = top_per_category(self._concat(), self.topk)
        self._parts, self._rows = [cols], int(cols[0].size)

    def _concat(self) -> tuple:
        if not self._parts:
            return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0))
        return tuple(np.concatenate([p[j] for p in self._parts]) for j in range(4))

    def reset(self) -> None:
        self._images.reset()
        self._parts, self._rows = [], 0

    def compute(self) -> dict:
        if self.fixed_ap:
            self._prune()
        parts = self._images.gather({"images": self._images.store, "cols": self._concat()})
        if parts is None:
            return {}
        seen, cols = set(), []
        for part in parts:
            if part is None:
                continue
            new = set(map(int, part["images"])) - seen
            c = part["cols"]
            keep = np.isin(c[0], np.fromiter(new, dtype=np.int64, count=len(new)))
            cols.append(tuple(x[keep] for x in c))
            seen |= new
        if not seen:
            raise CocoEvalError("LvisEvaluator.compute(): no image was updated")
        merged = tuple(np.concatenate([c[j] for c in cols]) for j in range(4))
        return evaluate_lvis(self.gt, merged, fixed_ap=self.fixed_ap, topk=self.topk,
                             max_dets_per_image=self.max_dets, img_ids=sorted(seen) if self.only_seen else None,
                             verbose=self.verbose, print_fn=self.print_fn, validate=False)


# --------------------------------------------------------------------------------------------- model runs


def lvis_chunks(names: Sequence[str], tokenizer, mode: str = "packed", max_len: int = 256,
                chunk_size: int = OFFICIAL_CHUNK, keep_budget: bool = True) -> list:
    """Prompt chunks for LVIS-style evaluation.

    ``mode="official"``: ``chunk_size`` (40) names per chunk, 300 detections kept per chunk pass.
    ``mode="packed"``: as many names per chunk as fit ``max_len`` tokens; with ``keep_budget`` the per-chunk
    detection and pre-NMS budgets scale with the names in the chunk (300 and 1000 per 40 names), so each class
    keeps the candidate budget it has under the official protocol.
    """
    if mode == "official":
        chunks = chunk_class_names(names, tokenizer, max_len=max_len, max_per_chunk=chunk_size)
        for ch in chunks:
            ch.post = {"detections_per_img": MAX_DETS_PER_IMAGE}
        return chunks
    if mode != "packed":
        raise CocoEvalError(f"unknown chunk mode {mode!r}; choose 'packed' or 'official'")
    chunks = chunk_class_names(names, tokenizer, max_len=max_len)
    for ch in chunks:
        scale = len(ch) / chunk_size if keep_budget else 1.0
        ch.post = {"detections_per_img": int(math.ceil(MAX_DETS_PER_IMAGE * scale)),
                   "pre_nms_top_n": int(math.ceil(1000 * scale))}
    return chunks


def lvis_names(gt) -> tuple:
    """(category ids sorted, names) of an LVIS json (the official prompt order: by id)."""
    data = gt.dataset if hasattr(gt, "dataset") else load_json(gt, "ground truth")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    return [int(c["id"]) for c in cats], [c["name"] for c in cats]


def evaluate_model_lvis(predictor, gt, image_root: Optional[str] = None, image_loader: Optional[Callable] = None,
                        chunking: str = "packed", reuse_backbone: bool = True, fixed_ap: bool = True,
                        batch_size: int = 1, max_images: Optional[int] = None, verbose: bool = True,
                        **post) -> dict:
    """Run a model over an LVIS set with chunked prompts and score it.

    ``chunking``: "packed" (as many names as fit 256 tokens) or "official" (40 names per chunk);
    ``reuse_backbone=False`` with ``chunking="official"`` is the official protocol (one full pass per chunk);
    the default reuses the image features for every chunk and each chunk's text features for every image.
    """
    from .predictor import load_image_record

    data = load_json(gt, "ground truth") if not hasattr(gt, "dataset") else gt.dataset
    cat_ids, names = lvis_names(data)
    chunks = lvis_chunks(names, predictor.model.tokenizer, mode=chunking, max_len=predictor.max_text_len)
    ev = LvisEvaluator(data, fixed_ap=fixed_ap, gather_fn=lambda o: [o], verbose=verbose)
    images = sorted(data["images"], key=lambda r: r["id"])[: max_images or None]
    for s in range(0, len(images), batch_size):
        recs = images[s : s + batch_size]
        pics = [image_loader(r) if image_loader else load_image_record(r, image_root) for r in recs]
        dets = predictor.detect(pics, chunks, reuse_backbone=reuse_backbone, max_detections=0, **post)
        ev.update([r["id"] for r in recs], dets, cat_ids)
    return ev.compute()


__all__ = [
    "FIXED_AP_TOPK",
    "MAX_DETS_PER_IMAGE",
    "LVIS_METRICS",
    "LvisEvaluator",
    "evaluate_lvis",
    "top_per_category",
    "top_per_image",
    "lvis_chunks",
    "lvis_names",
    "evaluate_model_lvis",
    "PromptChunk",
]
