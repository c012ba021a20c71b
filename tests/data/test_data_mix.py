"""Stages ``mix``, ``shard_list``, ``split_by_node``, ``split_by_worker``, ``shuffle``."""

import random
from collections import Counter

import pytest

from glip_pl.data.mix import WeightedSchedule, mix
from glip_pl.data.pipeline import GroundingStream, SourceSpec, resolve_source
from glip_pl.data.shardlists import check_enough_shards, shard_list, shuffle, split_by_node, split_by_worker


def test_schedule_holds_ratios_at_every_prefix():
    w = [0.5, 0.3, 0.2]
    sched, counts = WeightedSchedule(w), [0, 0, 0]
    for n in range(1, 3001):
        counts[sched.next()] += 1
        assert all(abs(c - n * x) < 1.0 for c, x in zip(counts, w))
    with pytest.raises(ValueError):
        WeightedSchedule([0, 0])


def test_finite_mix_stops_when_a_source_runs_out():
    out = list(mix([range(10), range(100)], [1, 1]))
    assert Counter(i for i, _ in out) == {0: 10, 1: 10}


def test_mixed_real_sources_over_thousands_of_samples(synthetic_shards, tokenizer):
    """Raw level of the real pipeline (resampled shards, shuffle buffers): 3000 samples hold 5 : 3 : 2."""
    specs = [SourceSpec(f"{synthetic_shards}/{k}", w) for k, w in (("detection", 5), ("grounding", 3),
                                                                    ("caption", 2))]
    stream = GroundingStream([resolve_source(s) for s in specs], tokenizer, 4, resampled=True, steps_per_epoch=10,
                             shuffle_buffer=20)
    raws = [stream.source_raw(i, 0, 1, epoch=0) for i in range(3)]
    kinds = Counter()
    for n, (si, raw) in enumerate(mix(raws, [5, 3, 2])):
        kinds[raw["__url__"].split("/")[-2]] += 1
        if n == 2999:
            break
    assert kinds == {"detection": 1500, "grounding": 900, "caption": 600}


def test_shard_splits_are_disjoint_and_cover():
    urls = [f"s{i}" for i in range(23)]
    order = shard_list(urls, seed=1, epoch=0)
    assert sorted(order) == sorted(urls) and order == shard_list(urls, 1, 0) and order != shard_list(urls, 1, 1)
    parts = [split_by_worker(split_by_node(order, r, 2), w, 3) for r in range(2) for w in range(3)]
    assert sorted(sum(parts, [])) == sorted(urls) and all(parts)
    with pytest.raises(ValueError, match="3 shard.*world_size 2 × num_workers 2 = 4"):
        check_enough_shards("coco", 3, 2, 2)


def test_shuffle_buffer_is_a_seeded_permutation():
    a = list(shuffle(range(100), 10, random.Random(0)))
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a == list(shuffle(range(100), 10, random.Random(0)))
    assert list(shuffle(range(5), 1, random.Random(0))) == list(range(5))
