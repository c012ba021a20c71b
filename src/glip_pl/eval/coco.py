"""COCO-style box AP: the 12 standard numbers from faster-coco-eval (or pycocotools), the table, and
``CocoEvaluator``, an accumulator for validation loops.

``CocoEvaluator`` accumulates detections batch by batch (labels = phrase index, mapped to category ids), keeps each
image once (the distributed sampler pads with repeated images) and gathers across ranks to rank 0
(``glip_pl.distributed.gather_on_rank0``) or through a callable the caller supplies. The zero-shot model loop is in
``zero_shot``, the class-name prompts in ``category_prompts``.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..model.types import Detections
from .detections import CocoEvalError, load_json, validate_detections
from .per_image import PerImage

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("faster", "pycocotools")


def _coco_class(backend: str):
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise CocoEvalError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def make_coco_gt(gt, backend: str = "faster"):
    """A COCO ground-truth object of ``backend`` from a path, a dict or an existing COCO object."""
    COCO, _ = _coco_class(backend)
    if hasattr(gt, "dataset") and hasattr(gt, "getImgIds"):
        if isinstance(gt, COCO):
            return gt
        gt = gt.dataset
    data = load_json(gt, "ground truth")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise CocoEvalError("ground truth: expected a COCO json object with 'images', 'annotations' and 'categories'")
    data.setdefault("categories", [])
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def load_results(coco_gt, dets: list, backend: str):
    """Detections → a results COCO object (``loadRes``), also when there are none."""
    COCO, _ = _coco_class(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        if dets:
            return coco_gt.loadRes(dets)
        res = COCO()
        res.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                       "annotations": []}
        res.createIndex()
        return res


# --------------------------------------------------------------------------------------------- scoring


def evaluate_coco(gt, detections, iou_type: str = "bbox", backend: str = "faster", img_ids: Optional[Sequence] = None,
                  verbose: bool = True, print_fn: Callable = print, validate: bool = True,
                  per_category: bool = False) -> dict:
    """Score detections against a COCO ground truth; the 12 standard metrics (AP, AP50, ..., ARl) as floats.

    gt: a COCO json path, dict or COCO object; detections: a list of ``{image_id, category_id, bbox (x, y, w, h),
    score}`` or a path to such a json. ``img_ids`` restricts the evaluation to those images (default: all images
    of the ground truth, the standard protocol). ``backend="pycocotools"`` uses the reference implementation.
    ``validate`` checks the detections first (``glip_pl.eval.detections``) and raises ``DetectionsFileError``
    naming the first bad record. Prints the standard table when ``verbose``. ``per_category`` adds
    ``metrics["per_category"]``: ``{category id: {"name", "AP", "AP50", "AP75", "instances"}}`` from the same
    evaluation (area "all", 100 detections per image; the APs are None for a category without ground truth).
    """
    if iou_type != "bbox":
        raise CocoEvalError(f"iou_type {iou_type!r}: GLIP predicts boxes only; use 'bbox'")
    coco_gt = make_coco_gt(gt, backend)
    if isinstance(detections, (str, os.PathLike)):
        dets = load_json(detections, "detections")
    else:  # shallow copies: loadRes adds fields to the records it is given
        dets = [dict(d) if isinstance(d, dict) else d for d in detections]
    if validate:
        dets = validate_detections(dets, coco_gt.dataset)
    coco_dt = load_results(coco_gt, dets, backend)
    _, Eval = _coco_class(backend)
    lines: list = []
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        kw = {"print_function": lines.append} if backend == "faster" else {}
        ev = Eval(coco_gt, coco_dt, iou_type, **kw)
        if img_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in img_ids})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # the 12 standard lines (faster-coco-eval adds AR@0.5 and AR@0.75 after them)
    table = [ln for ln in lines + buf.getvalue().splitlines() if ln.lstrip().startswith("Average")][: len(METRIC_NAMES)]
    if verbose:
        for ln in table:
            print_fn(ln)
    stats = np.asarray(ev.stats, dtype=np.float64)
    metrics = {k: float(stats[i]) for i, k in enumerate(METRIC_NAMES)}
    if per_category:
        metrics["per_category"] = _per_category(ev, coco_gt)
    return metrics


def _per_category(ev, coco_gt) -> dict:
    """Per-category AP / AP50 / AP75 from an accumulated COCOeval (its ``eval["precision"]``, T×R×K×A×M)."""
    precision = np.asarray(ev.eval["precision"])
    iou = np.asarray(ev.params.iouThrs)
    t50, t75 = int(np.argmin(np.abs(iou - 0.5))), int(np.argmin(np.abs(iou - 0.75)))
    names = {c["id"]: c.get("name", str(c["id"])) for c in coco_gt.dataset.get("categories", [])}
    counts: dict = {}
    for a in coco_gt.dataset.get("annotations", []):
        if not a.get("iscrowd", 0):
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1

    def mean(p):
        p = p[p > -1]
        return float(p.mean()) if p.size else None

    out = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]  # area "all", the last (largest) maxDets
        out[int(cat)] = {"name": names.get(cat, str(cat)), "AP": mean(p), "AP50": mean(p[t50]), "AP75": mean(p[t75]),
                         "instances": counts.get(cat, 0)}
    return out


def format_per_category(per_category: dict) -> str:
    """A plain table of ``evaluate_coco(..., per_category=True)["per_category"]``."""
    rows = [f"{'id':>6}  {'category':<28} {'AP':>6} {'AP50':>6} {'AP75':>6} {'inst':>6}"]
    for cat, m in per_category.items():
        ap = " ".join("     -" if m[k] is None else f"{m[k]:6.3f}" for k in ("AP", "AP50", "AP75"))
        rows.append(f"{cat:>6}  {m['name'][:28]:<28} {ap} {m['instances']:>6}")
    return "\n".join(rows)


def format_table(metrics: dict) -> str:
    """The metrics as the standard COCO summary lines (for logs and the CLI)."""
    rows = [
        ("Average Precision", "(AP)", "0.50:0.95", "all", 100, "AP"),
        ("Average Precision", "(AP)", "0.50", "all", 100, "AP50"),
        ("Average Precision", "(AP)", "0.75", "all", 100, "AP75"),
        ("Average Precision", "(AP)", "0.50:0.95", "small", 100, "APs"),
        ("Average Precision", "(AP)", "0.50:0.95", "medium", 100, "APm"),
        ("Average Precision", "(AP)", "0.50:0.95", "large", 100, "APl"),
        ("Average Recall", "(AR)", "0.50:0.95", "all", 1, "AR1"),
        ("Average Recall", "(AR)", "0.50:0.95", "all", 10, "AR10"),
        ("Average Recall", "(AR)", "0.50:0.95", "all", 100, "AR100"),
        ("Average Recall", "(AR)", "0.50:0.95", "small", 100, "ARs"),
        ("Average Recall", "(AR)", "0.50:0.95", "medium", 100, "ARm"),
        ("Average Recall", "(AR)", "0.50:0.95", "large", 100, "ARl"),
    ]
    return "\n".join(
        f" {t:<18} {s} @[ IoU={iou:<9} | area={a:>6s} | maxDets={m:>3d} ] = {metrics[k]:0.3f}"
        for t, s, iou, a, m, k in rows if k in metrics
    )


# --------------------------------------------------------------------------------------------- conversion


def xyxy_to_xywh(boxes, plus_one: bool = False) -> np.ndarray:
    """(K,4) x1,y1,x2,y2 → x,y,w,h. ``plus_one``: the official +1 convention (w = x2 − x1 + 1), for models
    built with ``official_compat`` scored on COCO as the official ``coco_eval`` does."""
    b = np.asarray(boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    b = b.reshape(-1, 4)
    extra = 1.0 if plus_one else 0.0
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0] + extra, b[:, 3] - b[:, 1] + extra], axis=1)


def detections_to_coco(dets: Sequence[Detections], image_ids: Sequence, phrase_to_category,
                       plus_one: bool = False) -> list:
    """Model detections → COCO result records.

    dets[i] belongs to image ``image_ids[i]``; ``phrase_to_category`` is, per image, a list mapping phrase index
    (``Detections.labels``) → category id; one list (not nested) is shared by every image.
    """
    if len(dets) != len(image_ids):
        raise CocoEvalError(f"{len(dets)} detections for {len(image_ids)} image ids")
    shared = len(phrase_to_category) > 0 and not isinstance(phrase_to_category[0], (list, tuple, np.ndarray, torch.Tensor))
    if not shared and len(phrase_to_category) != len(dets):
        raise CocoEvalError(f"{len(phrase_to_category)} phrase→category maps for {len(dets)} images")
    out = []
    for i, (d, img) in enumerate(zip(dets, image_ids)):
        cmap = phrase_to_category if shared else phrase_to_category[i]
        cmap = [int(c) for c in (cmap.tolist() if isinstance(cmap, (np.ndarray, torch.Tensor)) else cmap)]
        xywh = xyxy_to_xywh(d.boxes, plus_one)
        scores = d.scores.detach().cpu().double().tolist()
        labels = d.labels.detach().cpu().tolist()
        for k, (lab, sc) in enumerate(zip(labels, scores)):
            if not 0 <= lab < len(cmap):
                raise CocoEvalError(f"image {img}: phrase label {lab} has no category (map of {len(cmap)} phrases)")
            out.append({"image_id": int(img), "category_id": cmap[lab], "bbox": [float(v) for v in xywh[k]],
                        "score": float(sc)})
    return out


class CocoEvaluator:
    """Accumulate detections, then score them with ``evaluate_coco``.

    >>> ev = CocoEvaluator("instances_val2017.json")          # doctest: +SKIP
    >>> ev.update(image_ids, detections, phrase_labels)       # per batch; phrase index → category id
    >>> metrics = ev.compute()                                # rank 0: the 12 metrics; other ranks: {}

    ``gather_fn(obj) -> list of every rank's obj`` on the scoring rank and ``None`` elsewhere (default:
    ``glip_pl.distributed.gather_on_rank0``). Each image id is scored
    once, whichever rank saw it first. ``only_seen=True`` scores the images that were updated (a partial
    validation pass); False scores every ground-truth image (missing ones count as misses).
    """

    def __init__(self, gt, backend: str = "faster", gather_fn: Optional[Callable] = None, plus_one: bool = False,
                 only_seen: bool = True, verbose: bool = False, print_fn: Callable = print):
        self.gt = gt if hasattr(gt, "getImgIds") else load_json(gt, "ground truth")
        self.backend = backend
        self.plus_one = plus_one
        self.only_seen = only_seen
        self.verbose = verbose
        self.print_fn = print_fn
        self._images = PerImage(gather_fn)

    @property
    def num_images(self) -> int:
        return len(self._images.store)

    @property
    def duplicates(self) -> int:
        return self._images.duplicates

    def update(self, image_ids: Sequence, detections: Sequence[Detections], phrase_labels) -> None:
        """phrase_labels: per image, phrase index → category id (or one list for all images)."""
        recs = detections_to_coco(detections, image_ids, phrase_labels, plus_one=self.plus_one)
        by_img: dict = {int(i): [] for i in image_ids}
        for r in recs:
            by_img[r["image_id"]].append((r["category_id"], r["bbox"], r["score"]))
        for img in image_ids:
            rows = by_img[int(img)]
            arr = (np.asarray([c for c, _, _ in rows], dtype=np.int64),
                   np.asarray([b for _, b, _ in rows], dtype=np.float64).reshape(-1, 4),
                   np.asarray([s for _, _, s in rows], dtype=np.float64))
            self._images.add(img, arr)

    def reset(self) -> None:
        self._images.reset()

    def detections(self, store: Optional[dict] = None) -> list:
        store = self._images.store if store is None else store
        out = []
        for img in sorted(store):
            cats, boxes, scores = store[img]
            out += [{"image_id": img, "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
                    for c, b, s in zip(cats, boxes, scores)]
        return out

    def compute(self) -> dict:
        merged = self._images.gathered()
        if merged is None:
            return {}
        if not merged:
            raise CocoEvalError("CocoEvaluator.compute(): no image was updated")
        return evaluate_coco(self.gt, self.detections(merged), backend=self.backend,
                             img_ids=sorted(merged) if self.only_seen else None, verbose=self.verbose,
                             print_fn=self.print_fn)


__all__ = [
    "METRIC_NAMES",
    "CocoEvaluator",
    "evaluate_coco",
    "format_table",
    "format_per_category",
    "detections_to_coco",
    "xyxy_to_xywh",
    "make_coco_gt",
    "load_results",
]
