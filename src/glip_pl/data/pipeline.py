"""The streaming pipeline: the named stages of README.md wired per data-loader worker, resumable.

Every random choice is seeded by (seed, epoch, rank, logical worker, source or raw index), so a worker can start at
a raw position: the samples before it are read but not decoded. Every batch carries ``position`` = (logical worker,
first raw index, next raw index, batches done) so the loader knows exactly what has been consumed.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from torch.utils.data import IterableDataset, get_worker_info

from glip_pl.model.types import GLIPInputError

from .batch import collate
from .mix import mix
from .prompting import CategoryTable, PromptConfig, build_prompt, tokenize_sample
from .reader import decode_sample, expand_urls
from .schema import IMAGE_EXTS, ShardError
from .shardlists import read_shards, resampled, seeded, shard_list, shuffle, split_by_node, split_by_worker
from .transforms import TransformConfig, apply_transforms
from .shard_index import read_index

log = logging.getLogger(__name__)

STAGES = ("shard_list", "split_by_node", "split_by_worker", "read", "shuffle", "mix", "decode", "prompt",
          "transform", "tokenize", "collate")


@dataclass
class SourceSpec:
    """One source of the mix: a directory (with index.json), a brace pattern, a .tar, or a url list."""

    urls: Union[str, Sequence[str]]
    weight: float = 1.0
    split: str = "train"
    name: Optional[str] = None  # default: index.json's source, else the directory name
    kind: Optional[str] = None  # optional check against index.json
    categories: Optional[list] = None  # [{"id", "name"}], default: index.json's
    prompt_mode: Optional[str] = None  # detection prompts: "sampled" | "all"; default by train/eval
    box_loss_weight: float = 1.0  # weight of the boxes in loss_reg / loss_centerness (0: token loss only)


@dataclass
class ResolvedSource:
    name: str
    urls: list
    weight: float
    counts: Optional[list] = None  # samples per shard (from index.json), aligned with urls
    categories: Optional[list] = None
    kind: Optional[str] = None
    prompt_mode: Optional[str] = None
    box_loss_weight: float = 1.0
    table: Optional[CategoryTable] = field(default=None, repr=False)

    @property
    def num_samples(self) -> Optional[int]:
        return None if self.counts is None else sum(self.counts)


def resolve_source(spec: SourceSpec) -> ResolvedSource:
    path = spec.urls
    index, directory = {}, None
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(str(path)):
        directory = str(path)
        urls = expand_urls(directory, spec.split)  # checks the index against the files
        index = read_index(directory)
    else:
        urls = expand_urls(path)
        if urls and os.path.exists(urls[0]):
            directory = os.path.dirname(os.path.abspath(urls[0]))
            index = read_index(directory)
    counts = None
    if index:
        listed = {s["name"]: s for e in (index.get("splits") or {}).values() for s in e["shards"]}
        if all(os.path.basename(u) in listed for u in urls):
            for u in urls:  # shards named one by one: the counts are theirs only if the sizes agree
                size = os.path.getsize(u) if os.path.exists(u) else None  # a missing one fails when read
                want = listed[os.path.basename(u)].get("bytes")
                if None not in (size, want) and size != want:
                    raise ShardError(u, "-", "index.json", f"shard is {size} bytes but {directory}/index.json lists "
                                                           f"{want}: it belongs to another conversion")
            counts = [listed[os.path.basename(u)]["count"] for u in urls]
    kind = index.get("kind")
    if spec.kind and kind and spec.kind != kind:
        raise ValueError(f"source {spec.urls!r}: expected kind {spec.kind!r} but index.json says {kind!r}")
    name = spec.name or index.get("source") or os.path.basename(os.path.normpath(directory or str(urls[0])))
    if not urls:
        raise ValueError(f"source {name!r}: no shards found for {spec.urls!r} (split {spec.split!r})")
    return ResolvedSource(name=name, urls=urls, weight=float(spec.weight), counts=counts,
                          categories=spec.categories or index.get("categories"), kind=spec.kind or kind,
                          prompt_mode=spec.prompt_mode, box_loss_weight=float(spec.box_loss_weight))


class GroundingStream(IterableDataset):
    """The per-worker pipeline as an ``IterableDataset`` of ``GroundingBatch`` (batched inside the worker).

    The loader sets ``epoch``, ``start`` ({logical worker: (batches done, raw index)}) and ``rotation`` before each
    iteration; DataLoader copies them into its workers when the iteration starts.
    """

    def __init__(self, sources: Sequence[ResolvedSource], tokenizer, batch_size: int, *, seed: int = 0,
                 train: bool = True, resampled: bool = False, world_size: int = 1, rank: int = 0,
                 num_workers: int = 0, transforms: Optional[TransformConfig] = None,
                 prompts: Optional[PromptConfig] = None, shuffle_buffer: int = 0,
                 steps_per_epoch: Optional[int] = None, drop_last: bool = True, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if resampled and steps_per_epoch is None:
            raise ValueError("resampled mode never ends: give steps_per_epoch")
        self.sources = list(sources)
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.seed, self.train, self.resampled = int(seed), bool(train), bool(resampled)
        self.world_size, self.rank = int(world_size), int(rank)
        self.num_workers = max(int(num_workers), 1)
        self.transforms = transforms or (TransformConfig() if train else TransformConfig.eval())
        self.prompts = prompts or PromptConfig(mode="sampled" if train else "all")
        self.shuffle_buffer = int(shuffle_buffer)
        self.steps_per_epoch = steps_per_epoch
        self.drop_last, self.on_error = bool(drop_last), on_error
        self.pad_token_id = int(getattr(tokenizer, "pad_token_id", 0) or 0)
        for src in self.sources:
            if src.categories:
                src.table = CategoryTable(src.categories, tokenizer, self.prompts.separator)
        self.epoch, self.start, self.rotation = 0, {}, 0
        self.dropped = 0

    def source_raw(self, si: int, worker: int, num_workers: int, epoch: int, skipped=None):
        src = self.sources[si]
        shards = shard_list(src.urls, self.seed, epoch, shuffle=self.train)
        shards = split_by_node(shards, self.rank, self.world_size)
        shards = split_by_worker(shards, worker, num_workers)
        if self.resampled:
            shards = resampled(shards, seeded("resample", self.seed, epoch, self.rank, worker, si))
        on_read_error = None
        if self.on_error == "skip" and skipped is not None:
            def on_read_error(e):
                self.dropped += 1
                skipped[skip_reason(e)] += 1
                log.warning("skipping the rest of an unreadable shard: %s", e)
        raw = read_shards(shards, on_error=on_read_error)
        return shuffle(raw, self.shuffle_buffer, seeded("shuffle", self.seed, epoch, self.rank, worker, si))

    def process(self, raw: dict, si: int, rng) -> object:
        src = self.sources[si]
        sample = decode_sample(raw)
        sample.source = src.name
        if src.box_loss_weight != 1.0:
            sample.box_weight = src.box_loss_weight
        cfg = self.prompts
        if src.prompt_mode and src.prompt_mode != cfg.mode:
            cfg = PromptConfig(**{**cfg.__dict__, "mode": src.prompt_mode})
        sample = build_prompt(sample, src.table, rng, cfg)
        sample = apply_transforms(sample, rng, self.transforms)
        return tokenize_sample(sample, self.tokenizer, cfg.max_text_len)

    def worker_samples(self, worker: int, num_workers: int, epoch: int, skip: int = 0, skipped=None):
        """With ``on_error="skip"`` a bad sample is counted in ``skipped`` and the stream goes on; pickle members
        always raise."""
        if skipped is None:
            skipped = collections.Counter()
        streams = [self.source_raw(si, worker, num_workers, epoch, skipped) for si in range(len(self.sources))]
        in_row = 0
        for n, (si, raw) in enumerate(mix(streams, [s.weight for s in self.sources])):
            if n < skip:
                continue  # already consumed before a resume: read, never decoded
            rng = seeded("sample", self.seed, epoch, self.rank, worker, n)
            try:
                sample = self.process(raw, si, rng)
            except (ShardError, GLIPInputError) as e:
                if self.on_error == "raise" or "pickle-based members are refused" in getattr(e, "message", ""):
                    raise
                self.dropped += 1
                skipped[skip_reason(e)] += 1
                in_row += 1
                if in_row >= MAX_SKIPS_IN_A_ROW:  # a source of nothing but bad data would spin forever
                    raise ShardError(raw.get("__url__", ""), raw.get("__key__", ""), "-",
                                     f"{in_row} bad samples in a row: this source has no usable data") from e
                log.warning("skipping a bad sample (%d so far): %s", self.dropped, e)
                continue
            in_row = 0
            sample.position = (worker, n)
            yield sample

    def worker_batches(self, worker: int, num_workers: int, epoch: int, done: int = 0, skip: int = 0):
        quota = None
        if self.steps_per_epoch is not None:
            q, r = divmod(int(self.steps_per_epoch), num_workers)
            quota = q + (1 if worker < r else 0)
        skipped = collections.Counter()  # bad samples since the last batch, by reason: travels with the batch
        samples = self.worker_samples(worker, num_workers, epoch, skip, skipped)
        while quota is None or done < quota:
            buf = []
            for s in samples:
                buf.append(s)
                if len(buf) == self.batch_size:
                    break
            if not buf or (len(buf) < self.batch_size and self.drop_last):
                return
            done += 1
            batch = collate(buf, self.pad_token_id, self.transforms.size_divisibility,
                            position=(worker, buf[0].position[1], buf[-1].position[1] + 1, done))
            batch.skipped = dict(skipped)
            skipped.clear()
            yield batch
            if len(buf) < self.batch_size:
                return

    def __iter__(self):
        info = get_worker_info()
        phys, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if n != self.num_workers:
            raise RuntimeError(f"GroundingStream built for {self.num_workers} workers runs in {n}")
        worker = (phys + self.rotation) % n  # logical worker: keeps the batch order across a resume
        done, skip = self.start.get(worker, (0, 0))
        yield from self.worker_batches(worker, n, self.epoch, done, skip)


MAX_SKIPS_IN_A_ROW = 1000
SKIP_REASONS = ("bad_image", "bad_json", "bad_annotation", "unreadable_shard", "bad_sample")


def skip_reason(e: Exception) -> str:
    """The counter a skipped sample goes to (logged as ``data/skipped/<reason>``)."""
    if isinstance(e, ShardError):
        f = str(e.field)
        if f == "tar":
            return "unreadable_shard"
        if "undecodable image" in e.message or (f.rsplit(".", 1)[-1] in IMAGE_EXTS and "image is" not in e.message):
            return "bad_image"
        if f == "json" or "json" in e.message.split(":", 1)[0]:
            return "bad_json"
        if f.startswith("json."):
            return "bad_annotation"
    if isinstance(e, GLIPInputError):
        return "bad_annotation"
    return "bad_sample"


def build_pipeline(sources: Sequence[SourceSpec], tokenizer, batch_size: int, **kwargs) -> GroundingStream:
    """The pipeline as an ``IterableDataset`` (``build_loader`` wraps it with a DataLoader and resume state)."""
    return GroundingStream([resolve_source(s) for s in sources], tokenizer, batch_size, **kwargs)
