"""The typed batch (``GroundingBatch``) and the ``collate`` stage that builds it.

Shapes: B images, Hp/Wp padded image size (a multiple of 32), T tokens (the batch's longest prompt, ≤ 256),
M boxes (the largest count of the batch), P_b phrases of image b's prompt, M_b boxes of image b.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from glip_pl.model.types import Targets, TextInputs

from .schema import Sample


@dataclass
class GroundingBatch:
    """What the pipeline delivers to the model (contract with ``glip_pl.model``).

    Boxes are pixels of the transformed image. ``phrase_labels`` are the dataset's category ids for detection
    prompts, phrase indices for grounding.
    """

    images: Tensor  # (B, 3, Hp, Wp) uint8
    image_sizes: Tensor  # (B, 2) long (h, w) of the content after the transforms
    orig_sizes: Tensor  # (B, 2) long (h, w) of the stored image
    text: TextInputs  # (B, T)
    targets: Targets  # positive_map[b, m] is box m's row of phrase_maps[b]; box_weight only where one is != 1
    captions: list  # list[str]
    phrase_maps: list  # list[Tensor (P_b, T)] float 0/1
    phrase_names: list  # list[list[str]]
    phrase_labels: list  # list[list[int]]
    box_phrases: list  # list[Tensor (M_b,)] long
    ids: list  # list[str]
    kinds: list  # list[str]
    sources: list  # list[str]
    meta: list = field(default_factory=list)  # per image: spans_eval / scores / provenance / hidden / flags
    position: Optional[tuple] = None  # (logical worker, first raw index, next raw index): the loader's bookkeeping
    skipped: Optional[dict] = None  # bad samples dropped (by reason) while this batch was built (on_error="skip")
    skip_totals: Optional[dict] = None  # set by the loader: this rank's counts so far, incl. "kept" samples

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def pixel_mask(self) -> Tensor:
        """(B, Hp, Wp) bool, True on image content."""
        B, _, H, W = self.images.shape
        rows = torch.arange(H, device=self.images.device).view(1, H, 1) < self.image_sizes[:, 0].view(B, 1, 1)
        cols = torch.arange(W, device=self.images.device).view(1, 1, W) < self.image_sizes[:, 1].view(B, 1, 1)
        return rows & cols

    def to(self, device=None, non_blocking: bool = False) -> "GroundingBatch":
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                changes[f.name] = v.to(device, non_blocking=non_blocking)
            elif isinstance(v, (TextInputs, Targets)):
                changes[f.name] = v.to(device)
            elif f.name in ("phrase_maps", "box_phrases"):
                changes[f.name] = [t.to(device, non_blocking=non_blocking) for t in v]
        return replace(self, **changes)

    def pin_memory(self) -> "GroundingBatch":
        pin = lambda t: t.pin_memory()  # noqa: E731
        return replace(
            self, images=pin(self.images), image_sizes=pin(self.image_sizes), orig_sizes=pin(self.orig_sizes),
            text=TextInputs(*(None if t is None else pin(t) for t in
                              (self.text.input_ids, self.text.attention_mask, self.text.token_type_ids))),
            targets=replace(self.targets, **{f.name: pin(getattr(self.targets, f.name)) for f in fields(Targets)
                                              if getattr(self.targets, f.name) is not None}))


def pad_images(images: Sequence[Tensor], size_divisibility: int = 32) -> tuple:
    """(3, H, W) uint8 CPU images → ((B, 3, Hp, Wp) zero padded at the bottom/right, sizes (B, 2))."""
    hs = [int(im.shape[1]) for im in images]
    ws = [int(im.shape[2]) for im in images]
    d = max(int(size_divisibility), 1)
    Hp, Wp = -(-max(hs) // d) * d, -(-max(ws) // d) * d
    out = np.zeros((len(images), 3, Hp, Wp), dtype=np.uint8)  # numpy: see transforms.to_tensor
    for i, im in enumerate(images):
        out[i, :, : hs[i], : ws[i]] = im.numpy()
    return torch.from_numpy(out), torch.tensor(list(zip(hs, ws)), dtype=torch.long)


META_FIELDS = ("spans_eval", "scores", "provenance", "hidden")


def collate(samples: Sequence[Sample], pad_token_id: int = 0, size_divisibility: int = 32,
            position: Optional[tuple] = None) -> GroundingBatch:
    """Stage ``collate``."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    images, sizes = pad_images([s.image for s in samples], size_divisibility)
    B = len(samples)
    T = max(int(s.input_ids.shape[0]) for s in samples)
    M = max([len(s.boxes) for s in samples] + [0])
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    boxes = torch.zeros(B, M, 4)
    valid = torch.zeros(B, M, dtype=torch.bool)
    pmap = torch.zeros(B, M, T)
    phrase_maps = []
    for b, s in enumerate(samples):
        n, m = int(s.input_ids.shape[0]), len(s.boxes)
        ids[b, :n], mask[b, :n] = s.input_ids, 1
        pm = torch.zeros(s.phrase_map.shape[0], T)
        pm[:, :n] = s.phrase_map
        phrase_maps.append(pm)
        if m:
            boxes[b, :m], valid[b, :m] = s.boxes, True
            pmap[b, :m] = pm[s.box_phrases]
    optional = _collate_ignore(samples, T)
    if any(s.box_weight is not None and s.box_weight != 1.0 for s in samples):
        optional["box_weight"] = torch.tensor([1.0 if s.box_weight is None else float(s.box_weight)
                                               for s in samples])[:, None].expand(B, M).contiguous()
    meta = []
    for s in samples:
        d = {k: getattr(s, k) for k in META_FIELDS if getattr(s, k) is not None}
        d.update({k: v for k, v in s.extra.items() if k in ("flipped_words", "unmapped_phrases")})
        if s.category_ids is not None and s.kind != "detection":
            d["category_ids"] = s.category_ids
        meta.append(d)
    return GroundingBatch(
        images=images,
        image_sizes=sizes,
        orig_sizes=torch.tensor([[s.height, s.width] for s in samples], dtype=torch.long),
        text=TextInputs(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)),
        targets=Targets(boxes=boxes, valid=valid, positive_map=pmap, **optional),
        captions=[s.caption for s in samples],
        phrase_maps=phrase_maps,
        phrase_names=[list(s.phrase_names or []) for s in samples],
        phrase_labels=[list(s.phrase_labels or []) for s in samples],
        box_phrases=[s.box_phrases.clone() for s in samples],
        ids=[s.id for s in samples],
        kinds=[s.kind for s in samples],
        sources=[s.source for s in samples],
        meta=meta,
        position=position,
    )


def _collate_ignore(samples: Sequence[Sample], T: int) -> dict:
    """Ignore regions padded to K per image; {} when no sample has one (the loss then skips them)."""
    K = max(len(s.ignore_map) if s.ignore_map is not None else 0 for s in samples)
    if K == 0:
        return {}
    B = len(samples)
    boxes, valid, imap = torch.zeros(B, K, 4), torch.zeros(B, K, dtype=torch.bool), torch.zeros(B, K, T)
    for b, s in enumerate(samples):
        k = len(s.ignore_map) if s.ignore_map is not None else 0
        if k:
            boxes[b, :k], valid[b, :k] = s.ignore_boxes, True
            imap[b, :k, : s.ignore_map.shape[1]] = s.ignore_map
    return {"ignore_boxes": boxes, "ignore_valid": valid, "ignore_map": imap}
