"""Per-image results of an evaluator across ranks: each image scored once (the distributed sampler pads ranks with
repeated images), gathered to the scoring rank. Shared by the COCO, LVIS and Flickr30k accumulators."""

from __future__ import annotations

from typing import Callable, Optional


class PerImage:
    """First result per image id wins; ``gather_fn(obj)`` -> every rank's obj on the scoring rank, None elsewhere
    (default ``glip_pl.distributed.gather_on_rank0``)."""

    def __init__(self, gather_fn: Optional[Callable] = None):
        self.gather_fn = gather_fn
        self.store: dict = {}
        self.duplicates = 0

    def gather(self, obj):
        if self.gather_fn is not None:
            return self.gather_fn(obj)
        from ..distributed import gather_on_rank0  # eval imports nothing distributed at module level

        return gather_on_rank0(obj)

    def add(self, image_id, record) -> None:
        image_id = int(image_id)
        if image_id in self.store:
            self.duplicates += 1
            return
        self.store[image_id] = record

    def gathered(self) -> Optional[dict]:
        """All ranks' records merged (each image once) on the rank that scores; None on the others."""
        parts = self.gather(self.store)
        if parts is None:
            return None
        merged: dict = {}
        for part in parts:
            if part is None:
                continue
            for k, v in part.items():
                merged.setdefault(int(k), v)
        return merged

    def reset(self) -> None:
        self.store.clear()
        self.duplicates = 0
