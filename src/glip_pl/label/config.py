"""The pseudo-labelling job's options: ``LabelConfig`` (a recipe under ``recipes/label/``) and its ``FilterConfig``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from .phrases import PhraseConfig


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
    wandb: bool = True  # log the quality summary to W&B (offline unless an API key is set or WANDB_MODE says)
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

    @property
    def out_split(self) -> str:
        return self.output_split or self.split

    def to_dict(self) -> dict:
        return asdict(self)
