"""Pipeline stages over shard urls: shard list (seeded by seed and epoch), node split, worker split, resampling,
reading, the sample shuffle buffer, and the startup check.

Every random choice comes from a ``random.Random`` seeded by a string of the numbers that define it, so a stage
gives the same order in any process and in any run (string seeds hash with sha512: independent of
PYTHONHASHSEED).
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator, Sequence

from .reader import iter_raw
from .schema import ShardError


def seeded(*parts) -> random.Random:
    return random.Random("-".join(str(p) for p in parts))


def shard_list(urls: Sequence[str], seed: int, epoch: int, shuffle: bool = True) -> list:
    """Stage ``shard_list``: all shards of a source in an order seeded by (seed, epoch); same on every rank."""
    urls = list(urls)
    if shuffle:
        seeded("shards", seed, epoch).shuffle(urls)
    return urls


def split_by_node(urls: Sequence[str], rank: int, world_size: int) -> list:
    """Stage ``split_by_node``: rank r takes shards r, r + world_size, ... (disjoint across ranks)."""
    return list(urls[rank::world_size])


def split_by_worker(urls: Sequence[str], worker: int, num_workers: int) -> list:
    """Stage ``split_by_worker``: data-loader worker w of a rank takes every num_workers-th of the rank's shards."""
    return list(urls[worker::num_workers])


def check_enough_shards(name: str, num_shards: int, world_size: int, num_workers: int) -> None:
    """Startup check: every reader (rank × worker) needs at least one shard of every source.

    Otherwise webdataset-style pipelines fail late with "No samples found" in some worker; fail early instead.
    """
    readers = world_size * max(num_workers, 1)
    if num_shards < readers:
        raise ValueError(
            f"source {name!r} has {num_shards} shard(s) but world_size {world_size} × num_workers "
            f"{max(num_workers, 1)} = {readers} readers each need at least one: write more, smaller shards "
            "(glip-pl shards ... --target-bytes / --samples-per-shard) or use fewer data-loader workers")


def resampled(urls: Sequence[str], rng: random.Random) -> Iterator[str]:
    """Infinite stream of shards drawn with replacement (the ``resampled`` mode for max_steps training)."""
    urls = list(urls)
    while True:
        yield urls[rng.randrange(len(urls))]


def read_shards(urls: Iterable[str], on_error=None) -> Iterator[dict]:
    """Stage ``read``: raw samples ({"__key__", "__url__", ext: bytes}) of each shard in turn.

    ``on_error``: None raises a shard that cannot be read (truncated tar, missing file); a callable receives the
    ``ShardError`` and reading goes on with the next shard (the samples read before the damage are kept).
    """
    for url in urls:
        try:
            yield from iter_raw(url)
        except ShardError as e:
            if on_error is None:
                raise
            on_error(e)


def shuffle(items: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """Stage ``shuffle``: a sample shuffle buffer (bufsize <= 1 passes items through unchanged).

    Fills ``bufsize`` items, then for each new item yields a random buffered one in its place; finally the rest in
    random order.
    """
    if bufsize <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        k = rng.randrange(bufsize)
        out, buf[k] = buf[k], item
        yield out
    rng.shuffle(buf)
    yield from buf
