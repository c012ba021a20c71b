"""Pipeline stage ``transform``: box-aware multi-scale resize, horizontal flip (with left/right swap), to uint8 tensor.

Each transform takes and returns a ``Sample`` so the image, boxes, caption and spans stay consistent. Resize follows
the official ``Resize`` (reference §5). Images leave as uint8 RGB (3, H, W): normalisation is ``GLIP.normalize``'s.

Flip: the official code leaves captions alone, so "the cup left of the plate" grounds the wrong object after a
flip. Here left/right words are swapped in grounding and caption samples and every span follows (a verb "left" is
swapped too: a rare, harmless error next to the systematic one it fixes).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from .prompting import phrase_texts
from .schema import Sample

_SWAP = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_WORD = re.compile(r"\b(left|right|leftmost|rightmost)\b", re.IGNORECASE)


@dataclass
class TransformConfig:
    min_sizes: tuple = (480, 560, 640, 720, 800)  # short side, drawn uniformly per sample (MULT_MIN_SIZE_TRAIN)
    max_size: int = 1333  # long side cap (MAX_SIZE_TRAIN)
    flip_prob: float = 0.5  # AUGMENT.FLIP_PROB_TRAIN
    swap_left_right: bool = True
    size_divisibility: int = 32  # collate pads images to a multiple of this

    @classmethod
    def eval(cls, size: int = 800, max_size: int = 1333) -> "TransformConfig":
        return cls(min_sizes=(size,), max_size=max_size, flip_prob=0.0)

    @classmethod
    def tiny(cls, train: bool = True) -> "TransformConfig":
        """The synthetic scenes are 256×256."""
        if train:
            return cls(min_sizes=(224, 256, 288), max_size=512)
        return cls(min_sizes=(256,), max_size=512, flip_prob=0.0)


def target_size(w: int, h: int, short: int, max_size: int) -> tuple:
    """(new_w, new_h) as the official ``get_size``."""
    lo, hi = float(min(w, h)), float(max(w, h))
    if max_size and hi / lo * short > max_size:
        short = int(round(max_size * lo / hi))
    if (w <= h and w == short) or (h <= w and h == short):
        return w, h
    if w < h:
        return short, int(short * h / w)
    return int(short * w / h), short


def resize(sample: Sample, short: int, max_size: int) -> Sample:
    from PIL import Image

    w, h = sample.image.size
    nw, nh = target_size(w, h, short, max_size)
    if (nw, nh) != (w, h):
        sample.image = sample.image.resize((nw, nh), Image.BILINEAR)
        scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float32)
        if len(sample.boxes):
            sample.boxes = sample.boxes * scale.to(sample.boxes.dtype)
        if sample.ignore_boxes is not None and len(sample.ignore_boxes):
            sample.ignore_boxes = sample.ignore_boxes * scale.to(sample.ignore_boxes.dtype)
    sample.image_size = (nh, nw)
    return sample


def to_tensor(sample: Sample) -> Sample:
    """numpy does the copy: torch's multi-threaded kernels wake an OpenMP pool for each small op, several times slower
    than one core on a busy machine."""
    if not isinstance(sample.image, torch.Tensor):
        arr = np.asarray(sample.image, dtype=np.uint8)
        sample.image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    sample.image_size = (int(sample.image.shape[1]), int(sample.image.shape[2]))
    return sample


def swap_left_right(caption: str, span_lists: list) -> tuple:
    """(new caption, span lists moved onto it); a span edge inside a swapped word moves to the same edge of the
    replacement word."""
    pieces, edits, pos, shift = [], [], 0, 0  # edits: (old_start, old_end, new_start, new_end)
    for m in _WORD.finditer(caption):
        word = m.group(0)
        new = _SWAP[word.lower()]
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        pieces.append(caption[pos:m.start()])
        pieces.append(new)
        edits.append((m.start(), m.end(), m.start() + shift, m.start() + shift + len(new)))
        shift += len(new) - len(word)
        pos = m.end()
    if not edits:
        return caption, span_lists
    pieces.append(caption[pos:])

    def move(x: int, is_end: bool) -> int:
        d = 0
        for a, b, na, nb in edits:
            if x <= a:
                break
            if x < b or (x == b and is_end):
                return nb if is_end else na
            d = nb - b
        return x + d

    out = [[(move(s, False), move(e, True)) for s, e in spans] for spans in span_lists]
    return "".join(pieces), out


def hflip(sample: Sample, swap_words: bool = True) -> Sample:
    """Flip the image, the boxes (continuous: x1' = W - x2) and the caption's left/right words."""
    if isinstance(sample.image, torch.Tensor):
        W = int(sample.image.shape[-1])
        sample.image = torch.from_numpy(np.ascontiguousarray(sample.image.numpy()[:, :, ::-1]))
    else:
        from PIL import Image

        W = sample.image.size[0]
        sample.image = sample.image.transpose(Image.FLIP_LEFT_RIGHT)
    flip = lambda b: torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], dim=1)  # noqa: E731
    if len(sample.boxes):
        sample.boxes = flip(sample.boxes)
    if sample.ignore_boxes is not None and len(sample.ignore_boxes):
        sample.ignore_boxes = flip(sample.ignore_boxes)
    if swap_words and sample.kind != "detection" and sample.caption:
        lists = list(sample.phrase_spans or [])
        n_ph = len(lists)
        lists += list(sample.spans or [])
        n_sp = len(lists)
        lists += list(sample.ignore_spans or [])
        caption, moved = swap_left_right(sample.caption, lists)
        if caption != sample.caption:
            sample.caption = caption
            sample.phrase_spans = moved[:n_ph] if sample.phrase_spans is not None else None
            if sample.spans is not None:
                sample.spans = moved[n_ph:n_sp]
            if sample.ignore_spans is not None:
                sample.ignore_spans = moved[n_sp:]
            if sample.phrase_spans is not None:
                sample.phrase_names = phrase_texts(caption, sample.phrase_spans)
            sample.extra = dict(sample.extra, flipped_words=True)
    return sample


def apply_transforms(sample: Sample, rng: random.Random, cfg: TransformConfig) -> Sample:
    short = cfg.min_sizes[rng.randrange(len(cfg.min_sizes))] if len(cfg.min_sizes) > 1 else cfg.min_sizes[0]
    sample = resize(sample, short, cfg.max_size)
    if cfg.flip_prob > 0 and rng.random() < cfg.flip_prob:
        sample = hflip(sample, cfg.swap_left_right)
    return to_tensor(sample)
