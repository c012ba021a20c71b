"""The pseudo-labelling job: a teacher GLIP grounds the noun phrases of caption shards (GLIP §3.3, reference §3.4).

One Lightning ``predict`` run over every rank and node; rank r of W labels input shards r, r+W, ... (no sampler:
a shard is the unit of work, written by exactly one rank). For each input shard the job writes one grounding shard
of the same position (``<output>/<split>-%06d.tar``, the shards issue's schema: ``boxes``, ``spans`` per box,
``scores``, ``provenance``) under a temporary name, renamed when complete, with a ``.<name>.stats.json`` beside it
holding the shard's accounting. A killed job restarted with the same plan skips finished shards; SIGTERM stops the
job before its next batch (exit status 143). Every input sample is either labelled or counted as skipped with its
reason, so ``input == labelled + skipped`` holds per shard and in ``index.json``.

Prompt = the caption with its noun-phrase spans as the phrases to ground (as GLIP-L's pseudo data). Filters: score
> ``score_thresh`` (official ``CAPTION_CONF`` 0.5), the model's per-phrase NMS (``nms_thresh``), optional NMS across
phrases (``cross_phrase_nms``: one object, one phrase; not in the official data), ``top_k`` boxes per
phrase, ``max_boxes`` per image, at least ``min_boxes`` per caption (``CAPTION_MIN_BOX`` 1; official resamples, we
skip and count ``too_few_boxes``). Captions with no phrase: ``no_phrase: skip`` (counted) or ``keep`` (written with
no boxes). Captions with a phrase the teacher left without a box: ``unboxed_phrase: keep`` (official), ``skip``
(counted) or ``ignore``: kept (official), that phrase's tokens are negatives for every anchor, the missed object's
included; with ``ignore`` the sample carries a whole-image ignore region for that phrase instead.

Ignore regions (not in the official data): with ``ignore_thresh`` set, every teacher candidate scoring above it
that the filters did not keep and that overlaps no kept box at IoU >= ``ignore_overlap`` is written as an ignore
region (``ignore_boxes`` with the phrase's ``ignore_spans``);
the student's loss then takes no negative term for that phrase's tokens on anchors centred inside it, so an
object the teacher was unsure of does not train as background. Kept boxes are unchanged.

Skip reasons: ``bad_record`` (unreadable json / missing fields), ``non_text_caption``, ``empty_caption``,
``undecodable_image``, ``no_phrase``, ``too_few_boxes``, ``unboxed_phrase``.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import os
import signal
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Iterator, List, Optional

import numpy as np
import torch

from ..distributed import launch_rank_world
from .phrases import PhraseConfig, PhraseExtractor

log = logging.getLogger(__name__)

SKIP_REASONS = ("bad_record", "non_text_caption", "empty_caption", "undecodable_image", "no_phrase",
                "too_few_boxes", "unboxed_phrase")
HIST_BINS = 10  # score histogram over [0, 1]
PLAN_FILE = ".label.plan"


# --------------------------------------------------------------------------------------------- configuration


@dataclass
class FilterConfig:
    score_thresh: float = 0.5  # keep boxes with score > this (official CAPTION_CONF)
    candidate_thresh: float = 0.05  # teacher's own threshold: candidates for the histogram / kept fraction
    nms_thresh: Optional[float] = None  # per-phrase NMS IoU (None: the model's, 0.6)
    top_k: Optional[int] = None  # at most this many boxes per phrase (None: all)
    # class-agnostic NMS at this IoU over the boxes above score_thresh, before top_k: of boxes on one object only
    # the highest-scoring keeps it, whatever its phrase, and another phrase falls back to its next box. None: off
    # (official; one object may then serve two phrases)
    cross_phrase_nms: Optional[float] = None
    max_boxes: int = 100  # at most this many boxes per image (detections_per_img)
    min_boxes: int = 1  # fewer kept boxes → skipped as too_few_boxes (official CAPTION_MIN_BOX)
    no_phrase: str = "skip"  # caption with no phrase: "skip" (counted) or "keep" (written with no boxes)
    # a phrase left without a box: "keep" the caption (official; the phrase's tokens then train as negatives
    # everywhere, also on the object the teacher missed), "skip" it (counted as unboxed_phrase) or "ignore": keep
    # it with a whole-image ignore region for that phrase (its tokens then train as negatives nowhere)
    unboxed_phrase: str = "keep"
    # teacher candidates that were not kept but score above this become ignore regions for their phrase: the
    # student takes no negative loss for that phrase's tokens there (an object the teacher was unsure of does not
    # train as background). None: off (official: every unkept candidate trains as background)
    ignore_thresh: Optional[float] = None
    # ... unless it overlaps a kept box (any phrase) at IoU >= this: that object is labelled, the candidate is a
    # duplicate or a confusion of phrases, and stays a negative for its phrase. None: every unkept candidate
    ignore_overlap: Optional[float] = 0.5


@dataclass
class LabelConfig:
    teacher: str = ""  # a checkpoint this project loads (glip_pl file / Lightning / consolidated DeepSpeed)
    input: str = ""  # caption shards: a folder, a brace pattern or a list
    split: str = "train"  # input split (when ``input`` is a folder)
    output: str = ""  # output folder of the pseudo-labelled grounding shards
    output_split: Optional[str] = None  # default: the input split
    source: str = "pseudo"  # ``source`` of the written samples
    phrases: PhraseConfig = field(default_factory=PhraseConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    min_size: int = 800  # test resize (official 800/1333)
    max_size: Optional[int] = 1333
    batch_size: int = 8
    num_workers: int = 1
    accelerator: str = "auto"
    devices: object = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"  # "auto": bf16-mixed on GPU, 32-true on CPU
    overwrite: bool = False
    wandb: bool = False  # log the quality summary to W&B (offline unless WANDB_MODE says otherwise)
    wandb_project: str = "glip_pl"

    @classmethod
    def from_dict(cls, d: dict) -> "LabelConfig":
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown pseudo-label option(s) {unknown}; known: {sorted(known)}")
        ph = d.pop("phrases", None) or {}
        fl = d.pop("filters", None) or {}
        for name, sub, klass in (("phrases", ph, PhraseConfig), ("filters", fl, FilterConfig)):
            bad = sorted(set(sub) - set(klass.__dataclass_fields__))
            if bad:
                raise ValueError(f"unknown {name} option(s) {bad}; known: {sorted(klass.__dataclass_fields__)}")
        cfg = cls(**d, phrases=PhraseConfig(**ph), filters=FilterConfig(**fl))
        cfg.check()
        return cfg

    def check(self) -> None:
        for f in ("teacher", "input", "output"):
            if not getattr(self, f):
                raise ValueError(f"pseudo-label: `{f}` is required")
        if self.filters.no_phrase not in ("skip", "keep"):
            raise ValueError(f"filters.no_phrase must be 'skip' or 'keep', got {self.filters.no_phrase!r}")
        if self.filters.unboxed_phrase not in ("skip", "keep", "ignore"):
            raise ValueError("filters.unboxed_phrase must be 'skip', 'keep' or 'ignore', got "
                             f"{self.filters.unboxed_phrase!r}")
        t = self.filters.ignore_thresh
        if t is not None and not 0.0 <= float(t) < float(self.filters.score_thresh):
            raise ValueError(f"filters.ignore_thresh must be a score in [0, score_thresh={self.filters.score_thresh})"
                             f" or null, got {t!r}")
        o = self.filters.ignore_overlap
        if o is not None and not 0.0 < float(o) <= 1.0:
            raise ValueError(f"filters.ignore_overlap must be an IoU in (0, 1] or null, got {o!r}")
        x = self.filters.cross_phrase_nms
        if x is not None and not 0.0 < float(x) <= 1.0:
            raise ValueError(f"filters.cross_phrase_nms must be an IoU in (0, 1] or null, got {x!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------- helpers


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def resolve_teacher(path: str) -> str:
    """A checkpoint file, or a run's checkpoint folder (its ``last.ckpt``: the current student as the next
    teacher for a second round of self-training)."""
    if os.path.isdir(path):
        last = os.path.join(path, "last.ckpt")
        if not os.path.exists(last):
            raise FileNotFoundError(f"teacher {path!r} is a folder without last.ckpt")
        return last
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} does not exist")
    return path


def load_teacher(path: str):
    """The GLIP model of a checkpoint (glip_pl loaders); a file of the wrong kind is a clear error."""
    from ..eval.predictor import load_model

    return load_model(path)


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def input_shards(cfg: LabelConfig) -> list:
    from ..data.reader import expand_urls

    return expand_urls(cfg.input, cfg.split)


def output_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def stats_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, f".{name}.stats.json")


def token_char_limit(tokenizer, caption: str, max_len: int) -> int:
    """Characters of ``caption`` that fit ``max_len`` tokens ([CLS]/[SEP] included)."""
    enc = tokenizer(caption, truncation=True, max_length=max_len, return_offsets_mapping=True)
    ends = [int(e) for s, e in enc["offset_mapping"] if e > s]
    full = tokenizer(caption, truncation=False, return_length=True)["length"]
    full = full[0] if isinstance(full, list) else full
    if full <= max_len:
        return len(caption)
    return max(ends) if ends else 0


def cut_phrases(ph, limit: int):
    """Cut the caption to ``limit`` characters, dropping spans past it (and phrases left without spans)."""
    if limit >= len(ph.caption):
        return ph
    from .phrases import CaptionPhrases

    out = CaptionPhrases(caption=ph.caption[:limit], truncated=True)
    for spans, name in zip(ph.spans, ph.names):
        kept = [[s, e] for s, e in spans if e <= limit]
        if kept:
            out.spans.append(kept)
            out.names.append(name)
    return out


# --------------------------------------------------------------------------------------------- reading


class CaptionShardReader(torch.utils.data.IterableDataset):
    """Batches of one rank's input shards: each batch holds samples of one shard only; the last batch of a shard
    has ``last=True`` (possibly with no samples) and every batch lists the samples it skipped with their reason.

    Runs spaCy, decoding and the test resize (in DataLoader workers when ``num_workers`` > 0).
    """

    def __init__(self, shards: list, todo: list, cfg: LabelConfig, tokenizer, max_text_len: int):
        super().__init__()
        self.shards, self.todo, self.cfg = shards, list(todo), cfg
        self.tokenizer, self.max_text_len = tokenizer, max_text_len
        self._extractor = None

    def extractor(self) -> PhraseExtractor:
        if self._extractor is None:
            self._extractor = PhraseExtractor(self.cfg.phrases)
        return self._extractor

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        todo = self.todo if info is None else self.todo[info.id :: info.num_workers]
        for i in todo:
            yield from self._shard(i)

    def _decode(self, raw: dict):
        """(record, image tensor, orig (h, w), None, image bytes) or (record, None, None, reason, None)."""
        from PIL import Image

        from ..data.image_io import open_rgb
        from ..eval.predictor import resized_size

        try:
            rec = json.loads(raw["json"])
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError("no id")
        except Exception:
            return {"id": raw.get("__key__")}, None, None, "bad_record", None
        cap = rec.get("caption")
        if not isinstance(cap, str):
            return rec, None, None, "non_text_caption", None
        if not cap.strip():
            return rec, None, None, "empty_caption", None
        ext = rec.get("image") or next((e for e in ("jpg", "jpeg", "png", "webp") if e in raw), None)
        try:
            img = open_rgb(raw[ext])  # upright, 8-bit: the same decoder as training and the converters
        except Exception:
            return rec, None, None, "undecodable_image", None
        W, H = img.size
        h, w = resized_size(H, W, self.cfg.min_size, self.cfg.max_size) if self.cfg.min_size else (H, W)
        if (h, w) != (H, W):
            img = img.resize((w, h), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        rec["width"], rec["height"], rec["image"] = W, H, ext
        return rec, t, (H, W), None, raw[ext]

    def _shard(self, i: int) -> Iterator[dict]:
        from ..data.reader import iter_raw

        url = self.shards[i]
        decoded = [self._decode(raw) for raw in iter_raw(url)]
        ok = [d for d in decoded if d[3] is None]
        phrases = self.extractor()([d[0]["caption"] for d in ok])
        items, skipped, n_input = [], [], len(decoded)
        it = iter(phrases)
        for rec, t, orig, reason, data in decoded:
            if reason is not None:
                skipped.append((str(rec.get("id")), reason))
                continue
            ph = next(it)
            limit = token_char_limit(self.tokenizer, ph.caption, self.max_text_len)
            ph = cut_phrases(ph, limit)
            items.append({"rec": rec, "image": t, "image_bytes": data, "orig": orig, "caption": ph.caption, "spans": ph.spans,
                          "names": ph.names, "truncated": ph.truncated})
        bs = max(1, self.cfg.batch_size)
        batches = [items[s : s + bs] for s in range(0, len(items), bs)] or [[]]
        for b, chunk in enumerate(batches):
            last = b == len(batches) - 1
            yield {"shard": i, "items": chunk, "skipped": skipped if last else [], "last": last,
                   "n_input": n_input if last else 0}


def _collate_identity(x):
    return x


# --------------------------------------------------------------------------------------------- labelling


class ShardAccumulator:
    """Per output shard: records in input order and the accounting."""

    def __init__(self):
        self.samples: list = []  # (key, json bytes, image bytes, ext)
        self.stats = {"input": 0, "labelled": 0, "skipped": {}, "skipped_ids": {}, "phrases": 0, "boxes": 0,
                      "candidates": 0, "ignore_regions": 0, "truncated": 0, "score_hist": [0] * HIST_BINS,
                      "kept_hist": [0] * HIST_BINS, "phrases_per_caption_hist": {}, "boxes_per_image_hist": {}}

    def skip(self, sid: str, reason: str) -> None:
        s = self.stats
        s["skipped"][reason] = s["skipped"].get(reason, 0) + 1
        s["skipped_ids"].setdefault(reason, []).append(sid)


def _hist(scores, bins: int = HIST_BINS) -> list:
    if len(scores) == 0:
        return [0] * bins
    return np.histogram(np.clip(np.asarray(scores, dtype=np.float64), 0, 1), bins=bins, range=(0.0, 1.0))[0].tolist()


def filter_detections(det, P: int, f: FilterConfig) -> tuple:
    """(kept indices in descending score) after threshold, optional cross-phrase NMS, per-phrase top-k and max
    boxes."""
    scores = det.scores.float().cpu()
    labels = det.labels.cpu()
    keep = torch.nonzero(scores > f.score_thresh).flatten().tolist()
    keep.sort(key=lambda k: (-float(scores[k]), k))
    if f.cross_phrase_nms is not None and len(keep) > 1:
        from torchvision.ops import nms

        idx = torch.tensor(keep)
        survivors = nms(det.boxes.float().cpu()[idx], scores[idx], float(f.cross_phrase_nms))
        keep = sorted((keep[int(j)] for j in survivors), key=lambda k: (-float(scores[k]), k))
    if f.top_k is not None:
        per: dict = {}
        kk = []
        for k in keep:
            lab = int(labels[k])
            if per.get(lab, 0) < f.top_k:
                per[lab] = per.get(lab, 0) + 1
                kk.append(k)
        keep = kk
    keep = keep[: f.max_boxes]
    return keep


def ignore_candidates(det, keep: list, f: FilterConfig) -> list:
    """Indices of the candidates that were not kept but score above ``f.ignore_thresh`` and overlap no kept box at
    IoU >= ``f.ignore_overlap`` (descending score); [] when the option is off."""
    if f.ignore_thresh is None:
        return []
    scores = det.scores.float().cpu()
    kept = set(keep)
    out = [k for k in torch.nonzero(scores > f.ignore_thresh).flatten().tolist() if k not in kept]
    if out and keep and f.ignore_overlap is not None:
        from torchvision.ops import box_iou

        boxes = det.boxes.float().cpu()
        iou = box_iou(boxes[torch.tensor(out)], boxes[torch.tensor(keep)]).max(dim=1).values
        out = [k for k, v in zip(out, iou.tolist()) if v < f.ignore_overlap]
    return sorted(out, key=lambda k: (-float(scores[k]), k))


def _clip_box(b: list, W: int, H: int) -> Optional[list]:
    """``b`` clipped to the W x H image (in place), or None when nothing is left of it."""
    b[0], b[2] = min(max(b[0], 0.0), W), min(max(b[2], 0.0), W)
    b[1], b[3] = min(max(b[1], 0.0), H), min(max(b[3], 0.0), H)
    return b if b[2] > b[0] and b[3] > b[1] else None


def make_task(teacher, cfg: LabelConfig, out_dir: str, out_split: str, provenance: dict):
    """The LightningModule of the labelling run: ``predict_step`` labels a batch and writes a shard at its end."""
    import lightning.pytorch as pl

    class _LabelTask(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.teacher = teacher
            self.acc: dict = {}

        def forward(self, images, prompts, orig_sizes):
            f = cfg.filters
            lowest = min(f.candidate_thresh, f.score_thresh, f.ignore_thresh if f.ignore_thresh is not None else 1.0)
            post = {"score_thresh": lowest, "detections_per_img": max(f.max_boxes, 1)}
            if f.nms_thresh is not None:
                post["nms_thresh"] = f.nms_thresh
            return self.teacher.predict(images, prompts, orig_sizes=orig_sizes, **post)

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            from ..model.prompts import Prompt

            if self.trainer.received_sigterm:  # Lightning's handler only sets the flag; its predict loop never reads it
                from lightning.pytorch.utilities.exceptions import SIGTERMException

                raise SIGTERMException()
            i = batch["shard"]
            acc = self.acc.setdefault(i, ShardAccumulator())
            st = acc.stats
            items = batch["items"]
            run = [it for it in items if it["spans"]]
            dets = {}
            if run:
                prompts = [Prompt(it["caption"], [[tuple(s) for s in sp] for sp in it["spans"]], it["names"])
                           for it in run]
                out = self([it["image"] for it in run], prompts, [it["orig"] for it in run])
                dets = {id(it): d for it, d in zip(run, out)}
            for it in items:
                rec = it["rec"]
                st["input"] += 1
                P = len(it["spans"])
                if P == 0 and cfg.filters.no_phrase == "skip":
                    acc.skip(str(rec["id"]), "no_phrase")
                    continue
                boxes, spans, scores, labels, raw = [], [], [], [], []
                ignore_boxes, ignore_spans = [], []
                W, H = rec["width"], rec["height"]
                phrase_spans = [[list(map(int, s)) for s in sp] for sp in it["spans"]]  # per phrase, json-ready
                if P:
                    d = dets[id(it)]
                    box_of = lambda k: [round(float(v), 2) for v in d.boxes[k].tolist()]  # noqa: E731
                    all_scores = d.scores.float().cpu()
                    floor = min(cfg.filters.candidate_thresh, cfg.filters.score_thresh)  # ignore_thresh may be lower
                    all_scores = all_scores[all_scores > floor].tolist()
                    st["candidates"] += len(all_scores)
                    st["score_hist"] = [a + b for a, b in zip(st["score_hist"], _hist(all_scores))]
                    kept = filter_detections(d, P, cfg.filters)
                    for k in kept:
                        lab = int(d.labels[k])
                        boxes.append(box_of(k))
                        spans.append(phrase_spans[lab])
                        scores.append(round(float(d.scores[k]), 4))
                        raw.append(float(d.scores[k]))
                        labels.append(lab)
                    # clip to the image (the writer's schema wants boxes inside)
                    good = [j for j, b in enumerate(boxes) if _clip_box(b, W, H) is not None]
                    boxes, spans = [boxes[j] for j in good], [spans[j] for j in good]
                    scores, labels = [scores[j] for j in good], [labels[j] for j in good]
                    raw = [raw[j] for j in good]
                    if len(boxes) < cfg.filters.min_boxes:
                        acc.skip(str(rec["id"]), "too_few_boxes")
                        continue
                    if cfg.filters.unboxed_phrase == "skip" and len(set(labels)) < P:
                        acc.skip(str(rec["id"]), "unboxed_phrase")
                        continue
                    whole = set()
                    if cfg.filters.unboxed_phrase == "ignore":  # no negatives anywhere for a phrase without a box
                        whole = set(range(P)) - set(labels)
                        for lab in sorted(whole):
                            ignore_boxes.append([0.0, 0.0, float(W), float(H)])
                            ignore_spans.append(phrase_spans[lab])
                    for k in ignore_candidates(d, kept, cfg.filters):
                        lab = int(d.labels[k])
                        b = _clip_box(box_of(k), W, H)
                        if lab in whole or b is None:  # already ignored everywhere / nothing inside the image
                            continue
                        ignore_boxes.append(b)
                        ignore_spans.append(phrase_spans[lab])
                st["kept_hist"] = [a + b for a, b in zip(st["kept_hist"], _hist(raw))]  # unrounded, as candidates
                out_rec = {
                    "id": str(rec["id"]), "source": cfg.source, "kind": "grounding",
                    "width": int(rec["width"]), "height": int(rec["height"]), "caption": it["caption"],
                    "boxes": boxes, "spans": spans, "scores": scores, "provenance": provenance,
                    "extra": {**(rec.get("extra") or {}), "phrases": phrase_spans,
                              "phrase_names": it["names"], "box_phrases": labels, "input_source": rec.get("source"),
                              "truncated": bool(it["truncated"])},
                    "schema": 1, "image": rec.get("image") or "jpg",
                }
                if ignore_boxes:
                    out_rec["ignore_boxes"], out_rec["ignore_spans"] = ignore_boxes, ignore_spans
                if rec.get("hidden") is not None:  # synthetic truth rides along for scoring; never trained on
                    out_rec["hidden"] = rec["hidden"]
                acc.samples.append((out_rec, it))
                st["labelled"] += 1
                st["phrases"] += P
                st["boxes"] += len(boxes)
                st["ignore_regions"] += len(ignore_boxes)
                st["truncated"] += int(bool(it["truncated"]))
                for key, v in (("phrases_per_caption_hist", P), ("boxes_per_image_hist", len(boxes))):
                    st[key][str(v)] = st[key].get(str(v), 0) + 1
            for sid, reason in batch["skipped"]:
                st["input"] += 1
                acc.skip(sid, reason)
            if batch["last"]:
                self._write(i, batch["n_input"])
            return None

        def _write(self, i: int, n_input: int) -> None:
            acc = self.acc.pop(i)
            st = acc.stats
            if st["input"] != n_input:  # pragma: no cover - a bug, never a data problem
                raise RuntimeError(f"shard {i}: accounted {st['input']} samples but read {n_input}")
            write_output_shard(out_dir, output_name(out_split, i), acc)

    return _LabelTask()


def write_output_shard(out_dir: str, name: str, acc: ShardAccumulator) -> None:
    """Write one output shard under a temporary name, then its stats, then rename the shard (complete = named)."""
    from ..data.schema import Where, validate_record

    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for n, (rec, it) in enumerate(acc.samples):
                validate_record(rec, Where(file=name, record=rec["id"]), clip_tolerance=0.0)
                key = f"{n:09d}"
                _add_member(tar, f"{key}.{rec['image']}", it["image_bytes"])
                _add_member(tar, f"{key}.json", _dumps(rec).encode("utf-8"))
        st = dict(acc.stats, name=name, count=len(acc.samples), bytes=os.path.getsize(tmp))
        sp = stats_path(out_dir, name)
        with open(sp + ".tmp", "w") as f:
            json.dump(st, f)
        os.replace(sp + ".tmp", sp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------- the run


def _rank_world() -> tuple:
    return launch_rank_world()


def plan_hash(cfg: LabelConfig, shards: list, teacher_sha: str) -> str:
    ph = {k: v for k, v in cfg.phrases.to_dict().items() if k not in ("batch_size", "n_process")}
    filters = asdict(cfg.filters)
    if filters["unboxed_phrase"] == "keep":  # the default: earlier plans (before the option existed) keep their hash
        del filters["unboxed_phrase"]
    if filters["ignore_thresh"] is None:  # likewise (ignore_overlap means nothing without it)
        del filters["ignore_thresh"], filters["ignore_overlap"]
    plan = {"shards": [os.path.basename(s) for s in shards], "teacher": teacher_sha, "phrases": ph,
            "filters": filters, "min_size": cfg.min_size, "max_size": cfg.max_size,
            "source": cfg.source, "split": cfg.output_split or cfg.split}
    return hashlib.sha256(_dumps(plan).encode()).hexdigest()


def check_plan(out_dir: str, phash: str, overwrite: bool, write: bool) -> None:
    """Refuse to mix shards of another labelling (other input, teacher or options) into ``out_dir``."""
    path = os.path.join(out_dir, PLAN_FILE)
    old = open(path).read().strip() if os.path.exists(path) else None
    existing = [n for n in os.listdir(out_dir) if n.endswith(".tar") or n.endswith(".stats.json")]
    if old != phash and existing:
        if not overwrite:
            raise FileExistsError(f"{out_dir} holds shards of another labelling run (other input, teacher or "
                                  "options); pass overwrite: true (--overwrite) to replace them")
        if write:
            for n in existing + ["index.json"]:
                if os.path.exists(os.path.join(out_dir, n)):
                    os.remove(os.path.join(out_dir, n))
    if write:
        with open(path + ".tmp", "w") as f:
            f.write(phash + "\n")
        os.replace(path + ".tmp", path)


def rank_shards(n: int, rank: int, world: int) -> list:
    """Input shard positions labelled by ``rank``: r, r+W, r+2W, ..."""
    return list(range(rank, n, world))


def todo_shards(out_dir: str, out_split: str, mine: list) -> list:
    """Of ``mine``, the shards not finished by an earlier run (final name and stats both present); removes the
    temporaries a killed run left for them."""
    todo = []
    for i in mine:
        name = output_name(out_split, i)
        for n in os.listdir(out_dir):
            if n.startswith(f".{name}.tmp-"):
                os.remove(os.path.join(out_dir, n))
        if not (os.path.exists(os.path.join(out_dir, name)) and os.path.exists(stats_path(out_dir, name))):
            todo.append(i)
    return todo


def make_predict_loader(cfg: LabelConfig, shards: list, todo: list, tokenizer, max_text_len: int):
    ds = CaptionShardReader(shards, todo, cfg, tokenizer, max_text_len)
    workers = min(cfg.num_workers, len(todo))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=_collate_identity,
                                       persistent_workers=False)


def summarize(out_dir: str, out_split: str, n_shards: int) -> Optional[dict]:
    """Merge the per-shard stats into the split's index entry; None while some shards are unfinished."""
    stats = []
    for i in range(n_shards):
        sp = stats_path(out_dir, output_name(out_split, i))
        if not os.path.exists(sp) or not os.path.exists(os.path.join(out_dir, output_name(out_split, i))):
            return None
        with open(sp) as f:
            stats.append(json.load(f))
    tot = lambda k: sum(s[k] for s in stats)  # noqa: E731
    skipped, skipped_ids = {}, {}
    for s in stats:
        for k, v in s["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        for k, v in s["skipped_ids"].items():
            skipped_ids.setdefault(k, []).extend(v)
    hist = lambda k: [sum(s[k][b] for s in stats) for b in range(HIST_BINS)]  # noqa: E731

    def merged(k):
        out: dict = {}
        for s in stats:
            for a, b in s[k].items():
                out[a] = out.get(a, 0) + b
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))

    labelled, n_input = tot("labelled"), tot("input")
    return {
        "shards": [{"name": s["name"], "count": s["count"], "bytes": s["bytes"], "input": s["input"]} for s in stats],
        "count": tot("count"), "bytes": tot("bytes"), "input": n_input, "labelled": labelled,
        "skipped": skipped, "skipped_total": sum(skipped.values()),
        "skipped_ids": {k: v[:100] for k, v in skipped_ids.items()},
        "quality": {
            "images": labelled,
            "phrases_per_caption": tot("phrases") / max(labelled, 1),
            "boxes_per_image": tot("boxes") / max(labelled, 1),
            "boxes": tot("boxes"), "candidates": tot("candidates"),
            "ignore_regions": sum(s.get("ignore_regions", 0) for s in stats),  # 0 in stats of earlier versions
            "kept_fraction": labelled / max(n_input, 1),
            "kept_box_fraction": tot("boxes") / max(tot("candidates"), 1),
            "truncated_captions": tot("truncated"),
            "score_hist_bins": [round(b / HIST_BINS, 2) for b in range(HIST_BINS + 1)],
            "candidate_score_hist": hist("score_hist"), "kept_score_hist": hist("kept_hist"),
            "phrases_per_caption_hist": merged("phrases_per_caption_hist"),
            "boxes_per_image_hist": merged("boxes_per_image_hist"),
        },
    }


def format_summary(entry: dict) -> str:
    q = entry["quality"]
    lines = [f"pseudo-label summary: {entry['input']} input captions → {entry['labelled']} labelled "
             f"({q['kept_fraction']:.1%}), skipped {entry['skipped_total']} {entry['skipped']}",
             f"  phrases/caption {q['phrases_per_caption']:.2f}   boxes/image {q['boxes_per_image']:.2f}   "
             f"boxes kept {q['boxes']} of {q['candidates']} candidates ({q['kept_box_fraction']:.1%})   "
             f"truncated captions {q['truncated_captions']}   ignore regions {q.get('ignore_regions', 0)}",
             "  score histogram (candidates | kept):"]
    bins = q["score_hist_bins"]
    for b in range(HIST_BINS):
        lines.append(f"    [{bins[b]:.1f}, {bins[b + 1]:.1f})  {q['candidate_score_hist'][b]:>8d} | "
                     f"{q['kept_score_hist'][b]:>8d}")
    return "\n".join(lines)


def finalize(cfg: LabelConfig, n_shards: int, provenance: dict, phash: str) -> Optional[dict]:
    """Write the split's entry into ``index.json`` once every shard is finished; returns it (or None)."""
    from ..data.schema import SCHEMA_VERSION
    from ..data.writer import _write_index, read_index

    out_split = cfg.output_split or cfg.split
    entry = summarize(cfg.output, out_split, n_shards)
    if entry is None:
        return None
    entry.update(options=cfg.to_dict(), provenance=provenance, plan_hash=phash,
                 created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    index = read_index(cfg.output)
    index.update(schema_version=SCHEMA_VERSION, source=cfg.source, kind="grounding")
    index.setdefault("splits", {})[out_split] = entry
    _write_index(cfg.output, index)
    return entry


def _log_wandb(cfg: LabelConfig, entry: dict) -> None:
    try:
        import wandb
    except ImportError:  # pragma: no cover
        log.warning("wandb is not installed; the quality summary is only printed")
        return
    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project=cfg.wandb_project, dir=cfg.output, job_type="pseudo-label", config=cfg.to_dict())
    q = entry["quality"]
    run.summary.update({f"pseudo/{k}": v for k, v in q.items() if isinstance(v, (int, float))})
    run.summary.update({"pseudo/input": entry["input"], "pseudo/labelled": entry["labelled"],
                        "pseudo/skipped_total": entry["skipped_total"]})
    table = wandb.Table(columns=["bin", "candidates", "kept"],
                        data=[[q["score_hist_bins"][b], q["candidate_score_hist"][b], q["kept_score_hist"][b]]
                              for b in range(HIST_BINS)])
    run.log({"pseudo/score_hist": table})
    run.finish()


def provenance_of(cfg: LabelConfig, teacher_path: str, teacher_sha: str, teacher, spacy_info: dict) -> dict:
    import glip_pl

    return {"teacher": os.path.abspath(teacher_path), "teacher_sha256": teacher_sha,
            "teacher_config": {k: v for k, v in (teacher.cfg.to_dict().items() if hasattr(teacher.cfg, "to_dict")
                                                  else []) if isinstance(v, (int, float, str, bool)) or v is None},
            "score_thresh": cfg.filters.score_thresh, "nms_thresh": cfg.filters.nms_thresh,
            "top_k": cfg.filters.top_k, "min_boxes": cfg.filters.min_boxes, "max_boxes": cfg.filters.max_boxes,
            "unboxed_phrase": cfg.filters.unboxed_phrase, "cross_phrase_nms": cfg.filters.cross_phrase_nms,
            "ignore_thresh": cfg.filters.ignore_thresh, "ignore_overlap": cfg.filters.ignore_overlap,
            "min_size": cfg.min_size, "max_size": cfg.max_size,
            "spacy_model": cfg.phrases.model, "spacy_model_meta": spacy_info, "phrase_options": cfg.phrases.to_dict(),
            "glip_pl": glip_pl.__version__}


def run_label(cfg: LabelConfig, trainer_kwargs: Optional[dict] = None) -> dict:
    """Run the labelling job (this process's rank); returns {"entry": index entry or None, "done": shards}."""
    import lightning.pytorch as pl

    from .phrases import load_nlp, model_info

    cfg.check()
    teacher_path = resolve_teacher(cfg.teacher)
    teacher = load_teacher(teacher_path)  # a wrong kind of file fails here, before any work
    nlp_info = model_info(load_nlp(cfg.phrases.model))  # a missing spaCy model fails here too
    teacher_sha = file_sha256(teacher_path)
    shards = input_shards(cfg)
    out_split = cfg.output_split or cfg.split
    os.makedirs(cfg.output, exist_ok=True)
    phash = plan_hash(cfg, shards, teacher_sha)
    rank0, _ = _rank_world()
    check_plan(cfg.output, phash, cfg.overwrite, write=rank0 == 0)
    provenance = provenance_of(cfg, teacher_path, teacher_sha, teacher, nlp_info)

    accel = cfg.accelerator
    gpu = torch.cuda.is_available() and accel in ("auto", "gpu", "cuda")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if gpu else "32-true")
    kw = dict(accelerator=accel, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
              precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False, inference_mode=True)
    kw.update(trainer_kwargs or {})
    trainer = pl.Trainer(**kw)
    task = make_task(teacher, cfg, cfg.output, out_split, provenance)

    class _Data(pl.LightningDataModule):
        def predict_dataloader(self):
            t = self.trainer
            mine = rank_shards(len(shards), t.global_rank, t.world_size)
            self.todo = todo_shards(cfg.output, out_split, mine)
            if len(self.todo) < len(mine):
                log.warning("rank %d: resuming, %d of its %d shards already labelled", t.global_rank,
                            len(mine) - len(self.todo), len(mine))
            return make_predict_loader(cfg, shards, self.todo, teacher.tokenizer, teacher.cfg.max_text_len)

    dm = _Data()
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.predict(task, datamodule=dm, return_predictions=False)
    except SIGTERMException:  # finished shards are final; the shard in progress is labelled again on resume
        done = sum(os.path.exists(os.path.join(cfg.output, output_name(out_split, i))) for i in range(len(shards)))
        print(f"pseudo-label: stopped by SIGTERM (rank {trainer.global_rank}); {done} of {len(shards)} shards are "
              "finished; run the same command again to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM) from None
    trainer.strategy.barrier("pseudo-label-done")
    entry = None
    if trainer.global_rank == 0:
        entry = finalize(cfg, len(shards), provenance, phash)
        if entry is None:
            print(f"pseudo-label: not all {len(shards)} shards are finished yet (other ranks/jobs still running)")
        else:
            print(format_summary(entry), flush=True)
            if cfg.wandb:
                _log_wandb(cfg, entry)
    return {"entry": entry, "done": getattr(dm, "todo", [])}
