"""``build_loader``: the DataLoader the training shell uses, with the startup check and a resumable position.

The loader counts what its consumer has received, not what workers have prefetched, so a resume continues with
the next unseen samples in the same order as an uninterrupted run. With another world size, workers, batch size,
seed or sources that is impossible (shards are assigned to readers by rank and worker): it starts the next epoch
and warns.
"""

from __future__ import annotations

import collections
import logging
import os
import warnings
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from .pipeline import GroundingStream, SourceSpec, resolve_source
from .prompting import PromptConfig
from .shardlists import check_enough_shards
from .transforms import TransformConfig

log = logging.getLogger(__name__)
STATE_VERSION = 1


def _identity(x):
    return x


class GroundingLoader:
    """One epoch of ``GroundingBatch`` per ``iter()``; an eval loader starts every pass from the top."""

    def __init__(self, stream: GroundingStream, num_workers: int, pin_memory: bool = False,
                 prefetch_factor: Optional[int] = None, timeout: float = 0):
        self.stream = stream
        self.num_workers = int(num_workers)
        self.pin_memory, self.prefetch_factor, self.timeout = pin_memory, prefetch_factor, timeout
        self.epoch = 0
        self.batches = 0  # consumed in this epoch
        self.workers = {}  # logical worker -> (batches done, next raw index)
        self.history = collections.deque(maxlen=64)  # positions of the last batches, for the roll-back
        self.skips: collections.Counter = collections.Counter()  # over the whole run on this rank
        self.kept = 0
        self._counts = collections.deque(maxlen=64)  # (kept, skipped) of the last batches, for the roll-back
        self._resume_rank = None

    def __iter__(self):
        W = self.stream.num_workers
        s = self.stream
        if not s.train:
            # Lightning stops a sanity check or a limit_val_batches pass early; resuming there would make the next
            # validation score other images (or none at all).
            self._rewind()
        s.epoch, s.rotation = self.epoch, self.batches % W
        s.start = {w: (d, self._skip_for(w, d, r)) for w, (d, r) in self.workers.items()}
        kw = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kw["prefetch_factor"] = self.prefetch_factor
        # DataLoader otherwise draws its base seed from the global torch RNG, so a resumed run (one more iterator)
        # would train with another dropout stream than an uninterrupted one.
        kw["generator"] = torch.Generator().manual_seed(s.seed)
        dl = DataLoader(s, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                        pin_memory=self.pin_memory, persistent_workers=False, timeout=self.timeout, **kw)
        for batch in dl:
            w, _, nxt, done = batch.position
            self.workers[w] = (done, nxt)
            self.batches += 1
            self.history.append(batch.position)
            sk = batch.skipped or {}
            self.skips.update(sk)
            self.kept += len(batch)
            self._counts.append((len(batch), dict(sk)))
            batch.skip_totals = {**self.skips, "kept": self.kept}
            yield batch
        self.epoch += 1
        self._rewind()

    def _rewind(self) -> None:
        self.batches, self.workers, self._resume_rank = 0, {}, None
        self.history.clear()
        self._counts.clear()

    def _skip_for(self, worker: int, done: int, raw: int) -> int:
        if self._resume_rank is None or self._resume_rank == self.stream.rank:
            return raw
        # Another rank's state (Lightning saves rank 0's): with on_error="raise" every raw sample becomes one batch
        # element, so the batch count gives the raw position exactly.
        return done * self.stream.batch_size

    def __len__(self) -> int:
        """Known with ``steps_per_epoch`` or for one eval source with index.json; else TypeError ("no len")."""
        s = self.stream
        if s.steps_per_epoch is not None:
            return int(s.steps_per_epoch)
        if not s.train and len(s.sources) == 1 and s.sources[0].counts is not None:
            counts, W, total = s.sources[0].counts, s.num_workers, 0
            mine = list(range(len(counts)))[s.rank::s.world_size]
            for w in range(W):
                n = sum(counts[i] for i in mine[w::W])
                total += n // s.batch_size if s.drop_last else -(-n // s.batch_size)
            return total
        raise TypeError("length unknown: give steps_per_epoch (known without it: one eval source with index.json)")

    def signature(self) -> dict:
        s = self.stream
        return {"world_size": s.world_size, "num_workers": s.num_workers, "batch_size": s.batch_size,
                "seed": s.seed, "resampled": s.resampled, "steps_per_epoch": s.steps_per_epoch,
                "sources": [[x.name, len(x.urls), x.weight] for x in s.sources]}

    def state_dict(self, unconsumed: int = 0) -> dict:
        """``unconsumed``: batches fetched but not trained on yet (1 for Lightning's prefetch), handed out again."""
        workers, batches = dict(self.workers), self.batches
        hist = list(self.history)
        if unconsumed > len(hist):
            raise ValueError(f"cannot roll back {unconsumed} batches: only the last {len(hist)} are remembered")
        for w, first, _, done in reversed(hist[len(hist) - unconsumed:] if unconsumed else []):
            workers[w] = (done - 1, first)
            batches -= 1
        skips, kept = collections.Counter(self.skips), self.kept
        for n, sk in list(self._counts)[len(self._counts) - unconsumed:] if unconsumed else []:
            kept -= n
            skips.subtract(sk)
        return {"skips": {k: int(v) for k, v in skips.items() if v}, "kept": int(kept),
                "version": STATE_VERSION, "signature": self.signature(), "epoch": self.epoch, "batches": batches,
                "workers": {str(w): list(v) for w, v in workers.items()}, "rank": self.stream.rank,
                "dropped": self.stream.dropped}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown data-loader state version {state.get('version')!r}")
        self.history.clear()
        self._counts.clear()
        self.skips = collections.Counter({str(k): int(v) for k, v in (state.get("skips") or {}).items()})
        self.kept = int(state.get("kept", 0))
        if state["signature"] != self.signature():
            warnings.warn(
                "data loader resumed with a different configuration "
                f"(saved {state['signature']}, now {self.signature()}): the exact position cannot be "
                "restored; starting a freshly shuffled epoch instead (samples of the interrupted epoch may repeat)",
                stacklevel=2)
            self.epoch, self.batches, self.workers = int(state["epoch"]) + 1, 0, {}
            return
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.workers = {int(w): (int(d), int(r)) for w, (d, r) in state["workers"].items()}
        self._resume_rank = int(state.get("rank", self.stream.rank))
        if self._resume_rank != self.stream.rank and state.get("dropped"):
            warnings.warn("resuming from another rank's state that skipped bad samples: positions are "
                          "approximate", stacklevel=2)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches, self.workers = int(epoch), 0, {}
            self.history.clear()
            self._counts.clear()


def build_loader(
    sources: Sequence[SourceSpec],
    tokenizer,
    batch_size: int,
    *,
    num_workers: int = 0,
    seed: int = 0,
    train: bool = True,
    resampled: Optional[bool] = None,
    steps_per_epoch: Optional[int] = None,
    world_size: int = 1,
    rank: int = 0,
    transforms: Optional[TransformConfig] = None,
    prompts: Optional[PromptConfig] = None,
    shuffle_buffer: Optional[int] = None,
    drop_last: Optional[bool] = None,
    on_error: str = "raise",
    pin_memory: bool = False,
    prefetch_factor: Optional[int] = None,
) -> GroundingLoader:
    """A resumable loader of ``GroundingBatch`` over a weighted mix of shard sources.

    train=False: stored order, one size, no flip, all-class detection prompts, last partial batch kept.
    ``resampled`` (default: train) draws shards with replacement forever.
    """
    resolved = [resolve_source(s) for s in sources]
    if not resolved:
        raise ValueError("build_loader needs at least one source")
    for src in resolved:
        check_enough_shards(src.name, len(src.urls), world_size, num_workers)
    resampled = train if resampled is None else resampled
    if resampled and steps_per_epoch is None:
        counts = [src.num_samples for src in resolved]
        if any(c is None for c in counts):
            raise ValueError("resampled mode needs steps_per_epoch (sample counts unknown: no index.json)")
        steps_per_epoch = max(sum(counts) // (batch_size * world_size), 1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # it runs inside forked workers
    stream = GroundingStream(
        resolved, tokenizer, batch_size, seed=seed, train=train, resampled=resampled, world_size=world_size,
        rank=rank, num_workers=num_workers, transforms=transforms, prompts=prompts,
        shuffle_buffer=(1000 if train else 0) if shuffle_buffer is None else shuffle_buffer,
        steps_per_epoch=steps_per_epoch, drop_last=train if drop_last is None else drop_last, on_error=on_error)
    return GroundingLoader(stream, num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)
