"""Pipeline stages over shard urls, up to the sample shuffle buffer.

Every random choice comes from a ``random.Random`` seeded by a string of the numbers that define it, so a stage
gives the same order in any process and any run (string seeds hash with sha512, not PYTHONHASHSEED).
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator, Sequence

from .reader import iter_raw
from .schema import ShardError


def seeded(*parts) -> random.Random:
    return random.Random("-".join(str(p) for p in parts))


def shard_list(urls: Sequence[str], seed: int, epoch: int, shuffle: bool = True) -> list:
    """Stage ``shard_list``: the same order on every rank."""
    urls = list(urls)
    if shuffle:
        seeded("shards", seed, epoch).shuffle(urls)
    return urls


def split_by_node(urls: Sequence[str], rank: int, world_size: int) -> list:
    return list(urls[rank::world_size])


def split_by_worker(urls: Sequence[str], worker: int, num_workers: int) -> list:
    return list(urls[worker::num_workers])


def check_enough_shards(name: str, num_shards: int, world_size: int, num_workers: int) -> None:
    """Every reader (rank × worker) needs a shard of every source; fail now, not late in some worker."""
    readers = world_size * max(num_workers, 1)
    if num_shards < readers:
        raise ValueError(
            f"source {name!r} has {num_shards} shard(s) but world_size {world_size} × num_workers "
            f"{max(num_workers, 1)} = {readers} readers each need at least one: write more, smaller shards "
            "(glip-pl shards ... --target-bytes / --samples-per-shard) or use fewer data-loader workers")


def resampled(urls: Sequence[str], rng: random.Random) -> Iterator[str]:
    urls = list(urls)
    while True:
        yield urls[rng.randrange(len(urls))]


def read_shards(urls: Iterable[str], on_error=None) -> Iterator[dict]:
    """Stage ``read``; with ``on_error(ShardError)`` a damaged shard keeps what was read before the damage."""
    for url in urls:
        try:
            yield from iter_raw(url)
        except ShardError as e:
            if on_error is None:
                raise
            on_error(e)


def shuffle(items: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """Stage ``shuffle``: a sample shuffle buffer of ``bufsize`` items."""
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
