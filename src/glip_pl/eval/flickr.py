"""Flickr30k Entities phrase grounding: Recall@1/5/10 and the upper bound at IoU 0.5, overall and per phrase type.

Protocol (reference §6, official ``evaluation/flickr/flickr_eval.py`` after MDETR): one forward per (image,
sentence) with the sentence as the caption; each phrase of ``tokens_positive_eval`` is a class; the predicted
boxes of a phrase are ranked by score; a phrase is recalled at k when one of its k best boxes has IoU >= 0.5 with
one of its ground-truth boxes ("separate" GT: boxes are not merged); the upper bound uses all of its boxes. A
phrase with no prediction is a miss (the official code appends a dummy [0, 0, 0, 0] box).

Input: MDETR-style json (``final_flickr_separateGT_{val,test}.json``): ``images`` are (image, sentence) entries with
``caption`` and ``tokens_positive_eval`` (per phrase, a list of [start, end) character spans); ``annotations`` have
``image_id`` (the entry), ``bbox`` (x, y, w, h) and ``tokens_positive``. A phrase's ground truth is the set of
annotations whose spans equal the phrase's spans (or, failing that, overlap them). Phrase types (the official
reads them from ``Sentences/*.txt``) are taken, when present, from an entry's ``phrase_types`` (a list parallel to
``tokens_positive_eval``, each a type or a list of types) or from the annotations' ``phrase_type``; phrases with no
ground-truth box are skipped, as in the official evaluator.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional, Sequence

import numpy as np

from ..model.prompts import Prompt
from ..model.types import Detections
from .detections import CocoEvalError, load_json
from .per_image import PerImage

TOPK = (1, 5, 10, -1)  # -1: the upper bound (all boxes)
IOU_THRESH = 0.5


def box_iou_np(a: np.ndarray, b: np.ndarray, plus_one: bool = False) -> np.ndarray:
    """IoU of (n,4) and (m,4) x1,y1,x2,y2 boxes → (n,m)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    e = 1.0 if plus_one else 0.0
    area_a = np.clip(a[:, 2] - a[:, 0] + e, 0, None) * np.clip(a[:, 3] - a[:, 1] + e, 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0] + e, 0, None) * np.clip(b[:, 3] - b[:, 1] + e, 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt + e, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _span_key(spans) -> tuple:
    return tuple(sorted((int(s), int(e)) for s, e in spans))


def _overlaps(a, b) -> bool:
    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)


class FlickrGroundTruth:
    """Per entry: caption, phrase spans, per-phrase GT boxes (x1,y1,x2,y2) and phrase types."""

    def __init__(self, gt):
        data = load_json(gt, "ground truth")
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise CocoEvalError("Flickr ground truth: expected MDETR-style json with 'images' and 'annotations'")
        anns = defaultdict(list)
        for a in data["annotations"]:
            anns[int(a["image_id"])].append(a)
        self.entries: dict = {}
        for im in data["images"]:
            eid = int(im["id"])
            if "tokens_positive_eval" not in im or "caption" not in im:
                raise CocoEvalError(f"Flickr ground truth: image entry {eid} has no 'caption'/'tokens_positive_eval'")
            phrases = [[tuple(map(int, s)) for s in spans] for spans in im["tokens_positive_eval"]]
            types = im.get("phrase_types")
            boxes, ptypes = [], []
            for p, spans in enumerate(phrases):
                key = _span_key(spans)
                mine = [a for a in anns[eid] if _span_key(a.get("tokens_positive", a.get("tokens", []))) == key]
                if not mine:
                    mine = [a for a in anns[eid] if _overlaps(spans, a.get("tokens_positive", a.get("tokens", [])))]
                b = np.asarray([a["bbox"] for a in mine], dtype=np.float64).reshape(-1, 4)
                b[:, 2:] += b[:, :2]
                boxes.append(b)
                t = types[p] if types is not None and p < len(types) else None
                if t is None:
                    t = sorted({x for a in mine for x in _as_list(a.get("phrase_type"))})
                ptypes.append(_as_list(t))
            self.entries[eid] = {"caption": im["caption"], "phrases": phrases, "boxes": boxes, "types": ptypes,
                                 "file_name": im.get("file_name"), "record": im}

    def prompt(self, entry_id: int) -> Prompt:
        e = self.entries[int(entry_id)]
        names = [" ".join(e["caption"][s:t] for s, t in spans) for spans in e["phrases"]]
        return Prompt(caption=e["caption"], spans=[list(s) for s in e["phrases"]], names=names)

    def __len__(self) -> int:
        return len(self.entries)


def _as_list(t) -> list:
    if t is None:
        return []
    return [t] if isinstance(t, str) else list(t)


class RecallTracker:
    def __init__(self, topk: Sequence[int] = TOPK):
        self.topk = tuple(topk)
        self.total = defaultdict(int)
        self.pos = {k: defaultdict(int) for k in self.topk}

    def add(self, hits: dict, types: Sequence[str]) -> None:
        for name in ["all", *types]:
            self.total[name] += 1
            for k in self.topk:
                self.pos[k][name] += int(hits[k])

    def report(self) -> dict:
        out = {}
        for name in sorted(self.total, key=lambda n: (n != "all", n)):
            for k in self.topk:
                key = f"Upper_bound_{name}" if k == -1 else f"Recall@{k}_{name}"
                out[key] = self.pos[k][name] / self.total[name] if self.total[name] else 0.0
        return out


def phrase_hits(pred_boxes: np.ndarray, gt_boxes: np.ndarray, topk: Sequence[int] = TOPK,
                iou_thresh: float = IOU_THRESH, plus_one: bool = False) -> dict:
    """For one phrase: {k: recalled?} given its predicted boxes in decreasing score order."""
    if len(pred_boxes) == 0:
        return {k: False for k in topk}
    ious = box_iou_np(pred_boxes, gt_boxes, plus_one).max(axis=1)  # best GT per prediction
    return {k: bool((ious if k == -1 else ious[:k]).max(initial=0.0) >= iou_thresh) for k in topk}


def evaluate_flickr(gt, predictions: dict, topk: Sequence[int] = TOPK, iou_thresh: float = IOU_THRESH,
                    plus_one: bool = False, entry_ids: Optional[Sequence] = None, verbose: bool = True,
                    print_fn: Callable = print) -> dict:
    """Recall@k per phrase, overall ("..._all") and per phrase type, plus ``num_phrases``.

    predictions: {entry id: ``Detections`` (labels = phrase index, boxes in original pixels)} or
    {entry id: list per phrase of (n,4) x1,y1,x2,y2 boxes sorted by decreasing score}. Entries without
    predictions count as misses; ``entry_ids`` limits the evaluation to those entries (default: all).
    """
    ref = gt if isinstance(gt, FlickrGroundTruth) else FlickrGroundTruth(gt)
    tracker = RecallTracker(topk)
    ids = sorted(ref.entries) if entry_ids is None else sorted({int(i) for i in entry_ids})
    n = 0
    for eid in ids:
        if eid not in ref.entries:
            raise CocoEvalError(f"prediction for entry {eid}, which is not in the ground truth")
        e = ref.entries[eid]
        per_phrase = _per_phrase(predictions.get(eid), len(e["phrases"]))
        for p, gtb in enumerate(e["boxes"]):
            if len(gtb) == 0:
                continue  # a phrase without a box (e.g. "notvisual") is not scored
            tracker.add(phrase_hits(per_phrase[p], gtb, tracker.topk, iou_thresh, plus_one), e["types"][p])
            n += 1
    out = tracker.report()
    out["num_phrases"] = n
    if verbose:
        print_fn(format_flickr(out))
    return out


def _per_phrase(pred, P: int) -> list:
    if pred is None:
        return [np.zeros((0, 4))] * P
    if isinstance(pred, Detections):
        boxes = pred.boxes.detach().cpu().double().numpy().reshape(-1, 4)
        scores = pred.scores.detach().cpu().double().numpy()
        labels = pred.labels.detach().cpu().numpy()
        order = np.argsort(-scores, kind="stable")
        out = []
        for p in range(P):
            sel = order[labels[order] == p]
            out.append(boxes[sel])
        return out
    if len(pred) != P:
        raise CocoEvalError(f"{len(pred)} phrase box lists for {P} phrases")
    return [np.asarray(b, dtype=np.float64).reshape(-1, 4) for b in pred]


def format_flickr(metrics: dict) -> str:
    types = sorted({k.split("_", 1)[1] for k in metrics if k.startswith("Recall@")}, key=lambda n: (n != "all", n))
    ks = sorted({k.split("_")[0] for k in metrics if k.startswith("Recall@")}, key=lambda s: int(s.split("@")[1]))
    head = f"{'phrase type':<14}" + "".join(f"{k:>11}" for k in ks) + f"{'Upper bound':>13}"
    rows = [head]
    for t in types:
        rows.append(f"{t:<14}" + "".join(f"{metrics[f'{k}_{t}']:>11.4f}" for k in ks)
                    + f"{metrics.get(f'Upper_bound_{t}', float('nan')):>13.4f}")
    return "\n".join(rows)


class FlickrEvaluator:
    """Accumulate per-entry detections (labels = phrase index); ``compute()`` on the scoring rank."""

    def __init__(self, gt, gather_fn: Optional[Callable] = None, plus_one: bool = False, only_seen: bool = False,
                 verbose: bool = True, print_fn: Callable = print):
        self.gt = gt if isinstance(gt, FlickrGroundTruth) else FlickrGroundTruth(gt)
        self.plus_one, self.only_seen, self.verbose, self.print_fn = plus_one, only_seen, verbose, print_fn
        self._store = PerImage(gather_fn)

    def update(self, entry_ids: Sequence, detections: Sequence[Detections]) -> None:
        for eid, d in zip(entry_ids, detections):
            eid = int(eid)
            if eid not in self.gt.entries:
                raise CocoEvalError(f"entry {eid} is not in the Flickr ground truth")
            self._store.add(eid, _per_phrase(d, len(self.gt.entries[eid]["phrases"])))

    def reset(self) -> None:
        self._store.reset()

    def compute(self) -> dict:
        merged = self._store.gathered()
        if merged is None:
            return {}
        return evaluate_flickr(self.gt, merged, plus_one=self.plus_one,
                               entry_ids=sorted(merged) if self.only_seen else None, verbose=self.verbose,
                               print_fn=self.print_fn)


def evaluate_model_flickr(predictor, gt, image_root: Optional[str] = None, image_loader: Optional[Callable] = None,
                          max_images: Optional[int] = None, verbose: bool = True, **post) -> dict:
    """Run a model on Flickr30k Entities: every sentence of an image reuses that image's backbone features."""
    from .chunked import PromptChunk
    from .predictor import load_image_record

    ref = FlickrGroundTruth(gt)
    by_file = defaultdict(list)
    for eid, e in sorted(ref.entries.items()):
        by_file[e["file_name"] or eid].append(eid)
    ev = FlickrEvaluator(ref, gather_fn=lambda o: [o], verbose=verbose)
    post.setdefault("detections_per_img", 100)
    for n, (key, eids) in enumerate(by_file.items()):
        if max_images and n >= max_images:
            break
        rec = ref.entries[eids[0]]["record"]
        pic = image_loader(rec) if image_loader else load_image_record(rec, image_root)
        chunks = [PromptChunk(ref.prompt(eid), list(range(len(ref.entries[eid]["phrases"])))) for eid in eids]
        per_chunk = predictor.detect([pic], chunks, merge=False, **post)[0]
        ev.update(eids, per_chunk)
    ev.only_seen = bool(max_images)
    return ev.compute()


__all__ = [
    "FlickrGroundTruth",
    "FlickrEvaluator",
    "evaluate_flickr",
    "evaluate_model_flickr",
    "phrase_hits",
    "box_iou_np",
    "format_flickr",
    "TOPK",
]
