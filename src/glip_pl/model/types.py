"""Typed contracts between the stages of the model (DESIGN.md practice 8).

Shape legend of every file in ``glip_pl.model`` (a file names only the letters it adds):
  B batch, L FPN levels (5: P3..P7), C channels (256 for T/L), N = sum_l H_l*W_l locations (one anchor each),
  T text tokens (padded to the longest prompt of the batch), D text width (768 for BERT-base), M boxes per
  image (padded to the largest count of the batch), P phrases of a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
from torch import Tensor


class GLIPInputError(ValueError):
    """Bad input given to the model or its prompt tools; the message says which input and why."""


def _to(obj, device=None, dtype=None):
    changes = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Tensor):
            if dtype is not None and v.is_floating_point():
                changes[f.name] = v.to(device=device, dtype=dtype)
            else:
                changes[f.name] = v.to(device=device)
    return replace(obj, **changes)


@dataclass
class TextInputs:
    """A tokenised batch of prompts, padded to the longest prompt (T)."""

    input_ids: Tensor  # (B, T) long
    attention_mask: Tensor  # (B, T) long/bool, 1 for [CLS], tokens, [SEP]
    token_type_ids: Optional[Tensor] = None  # (B, T) long

    def to(self, device=None):
        return _to(self, device)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def pad_to(self, length: int, pad_id: int = 0) -> "TextInputs":
        """Right-pad every tensor to ``length`` tokens (the official code pads every prompt to 256)."""
        extra = length - self.length
        if extra < 0:
            raise GLIPInputError(f"cannot pad {self.length} tokens down to {length}")
        if extra == 0:
            return self
        pad = lambda t, v: torch.nn.functional.pad(t, (0, extra), value=v)  # noqa: E731
        return TextInputs(
            input_ids=pad(self.input_ids, pad_id),
            attention_mask=pad(self.attention_mask, 0),
            token_type_ids=None if self.token_type_ids is None else pad(self.token_type_ids, 0),
        )


@dataclass
class Targets:
    """Ground truth of a batch, padded per image to M boxes, in pixels of the (resized, padded) network input.

    ``positive_map`` is binary, as the official collator makes it (GLIP §3.1). Ignore regions come from pseudo
    labels: an anchor whose centre lies inside ``ignore_boxes[b, k]`` takes no negative token loss on the tokens
    of ``ignore_map[b, k]``, so an object the teacher missed does not train as background for its phrase.
    ``box_weight`` 0 lets a box train only the token loss (a pseudo box placed less exactly than a human's).
    """

    boxes: Tensor  # (B, M, 4) float
    valid: Tensor  # (B, M) bool — False for padding rows
    positive_map: Tensor  # (B, M, T) float 0/1
    ignore_boxes: Optional[Tensor] = None  # (B, K, 4) float, same pixels as boxes
    ignore_valid: Optional[Tensor] = None  # (B, K) bool
    ignore_map: Optional[Tensor] = None  # (B, K, T) float 0/1
    box_weight: Optional[Tensor] = None  # (B, M) float >= 0: weight in loss_reg / loss_centerness

    def to(self, device=None, dtype=None):
        return _to(self, device, dtype)

    def with_text_length(self, length: int) -> "Targets":
        """Pad (or cut, only all-zero columns) the token dimension of the maps to ``length``."""
        changes = {}
        for name in ("positive_map", "ignore_map"):
            m = getattr(self, name)
            if m is None:
                continue
            extra = length - m.shape[-1]
            if extra > 0:
                changes[name] = torch.nn.functional.pad(m, (0, extra))
            elif extra < 0:
                if m[..., length:].any():
                    raise GLIPInputError(f"targets.{name} marks tokens beyond the prompt's {length} tokens")
                changes[name] = m[..., :length]
        return replace(self, **changes) if changes else self

    def pad_text_to(self, length: int) -> "Targets":
        return self if length <= self.positive_map.shape[-1] else self.with_text_length(length)


@dataclass
class GroundingOutputs:
    """Raw head outputs for all levels, flattened level-major (P3 first) into N locations."""

    logits: Tensor  # (B, N, T) region-token alignment logits
    box_regression: Tensor  # (B, N, 4) deltas, already multiplied by the per-level learnable scale
    centerness: Tensor  # (B, N) logits
    anchors: Tensor  # (N, 4) x1, y1, x2, y2 in input pixels (same for every image of the batch)
    level_sizes: list = field(default_factory=list)  # [(H_l, W_l)] for l = 0..L-1
    text_mask: Optional[Tensor] = None  # (B, T) bool, True for real tokens

    @property
    def num_anchors_per_level(self) -> list:
        return [h * w for h, w in self.level_sizes]


@dataclass
class Detections:
    """Post-processed detections of one image; ``labels`` index the phrases of that image's prompt."""

    boxes: Tensor  # (K, 4) x1, y1, x2, y2 in original image pixels
    scores: Tensor  # (K,)
    labels: Tensor  # (K,) long, phrase index (0-based)
    phrases: list = field(default_factory=list)  # phrase text per label index (optional)

    def __len__(self) -> int:
        return int(self.scores.shape[0])
