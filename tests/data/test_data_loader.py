"""``build_loader``: startup check, exact resume (same batches as an uninterrupted run), rank splits, epochs."""

import warnings

import pytest
import torch

from glip_pl.data import GroundingBatch, SourceSpec, TransformConfig, build_loader, iter_samples


def _specs(root, split="train"):
    return [SourceSpec(f"{root}/grounding", 2.0, split=split), SourceSpec(f"{root}/detection", 1.0, split=split)]


def _loader(root, tokenizer, **kw):
    args = dict(batch_size=4, seed=7, transforms=TransformConfig.tiny(), shuffle_buffer=16)
    args.update(kw)
    return build_loader(_specs(root), tokenizer, **args)


def _key(b: GroundingBatch):
    return [(s, i, c) for s, i, c in zip(b.sources, b.ids, b.captions)], b.images.sum().item()


@pytest.mark.parametrize("workers,resampled", [(0, True), (2, True), (2, False)])
def test_resume_continues_with_the_next_unseen_batches(synthetic_shards, tokenizer, workers, resampled):
    kw = dict(num_workers=workers, resampled=resampled, steps_per_epoch=9 if resampled else None)
    full = [_key(b) for b in _loader(synthetic_shards, tokenizer, **kw)]
    # one pass (not resampled) ends when the grounding source (weight 2, 96 samples) runs out: 96 + 48 = 144 = 36 x 4
    assert len(full) == (9 if resampled else 36)
    first = _loader(synthetic_shards, tokenizer, **kw)
    got = []
    for b in first:
        got.append(_key(b))
        if len(got) == 5:
            break
    state = first.state_dict()
    resumed = _loader(synthetic_shards, tokenizer, **kw)
    resumed.load_state_dict(state)
    got += [_key(b) for b in resumed]
    assert got == full  # same samples, same order, same augmentations
    # and the following epoch matches an uninterrupted second epoch too
    ref = _loader(synthetic_shards, tokenizer, **kw)
    list(ref)
    assert [_key(b) for b in resumed] == [_key(b) for b in ref]


def test_unconsumed_batches_are_handed_out_again(synthetic_shards, tokenizer):
    kw = dict(num_workers=0, steps_per_epoch=6)
    loader = _loader(synthetic_shards, tokenizer, **kw)
    seen = []
    for b in loader:
        seen.append(_key(b))
        if len(seen) == 3:
            break
    resumed = _loader(synthetic_shards, tokenizer, **kw)
    resumed.load_state_dict(loader.state_dict(unconsumed=1))  # e.g. Lightning's one-batch prefetch
    assert _key(next(iter(resumed))) == seen[2]


def test_other_world_layout_falls_back_to_a_reshuffled_epoch(synthetic_shards, tokenizer):
    a = _loader(synthetic_shards, tokenizer, num_workers=0, steps_per_epoch=6)
    next(iter(a))
    b = _loader(synthetic_shards, tokenizer, num_workers=2, steps_per_epoch=6)
    with pytest.warns(UserWarning, match="freshly shuffled"):
        b.load_state_dict(a.state_dict())
    assert b.epoch == 1 and len(list(b)) == 6


def test_eval_ranks_see_every_sample_once(synthetic_shards, tokenizer):
    want = sorted(s.id for s in iter_samples(f"{synthetic_shards}/grounding", split="val", decode_images=False))
    seen = []
    for rank in range(2):
        loader = build_loader([SourceSpec(f"{synthetic_shards}/grounding", split="val")], tokenizer, batch_size=5,
                              train=False, world_size=2, rank=rank, transforms=TransformConfig.tiny(train=False))
        batches = list(loader)
        assert len(batches) == len(loader)
        seen += [i for b in batches for i in b.ids]
        assert all(b.image_sizes.min() == 256 for b in batches)  # one eval size, no flip
    assert sorted(seen) == want


def test_eval_pass_stopped_early_restarts_from_the_first_sample(synthetic_shards, tokenizer):
    """Lightning stops a sanity check (num_sanity_val_steps) or a limit_val_batches pass early; the next validation
    must score the same images from the top, not resume where the last one stopped (or find nothing left)."""
    for workers in (0, 1):
        loader = build_loader([SourceSpec(f"{synthetic_shards}/detection", split="val")], tokenizer, batch_size=2,
                              train=False, num_workers=workers, transforms=TransformConfig.tiny(train=False))
        it = iter(loader)
        first = [next(it).ids for _ in range(2)]  # a sanity check of 2 batches
        del it
        full = [b.ids for b in loader]
        assert full[:2] == first and len(full) == len(loader) == 16  # all 32 val images, from the first
        assert [b.ids for b in loader] == full  # and again after a complete pass


def test_startup_check_names_the_source(synthetic_shards, tokenizer):
    with pytest.raises(ValueError, match="synthetic-grounding.*2 shard.*world_size 2 × num_workers 2"):
        build_loader([SourceSpec(f"{synthetic_shards}/grounding", split="val")], tokenizer, 4, num_workers=2,
                     world_size=2, train=False)


def test_epochs_reshuffle_and_detection_prompts_vary(synthetic_shards, tokenizer):
    loader = _loader(synthetic_shards, tokenizer, num_workers=0, resampled=False)
    e0 = [i for b in loader for i in b.ids]
    e1 = [i for b in loader for i in b.ids]
    assert e0 != e1 and loader.epoch == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = next(iter(loader))
    det = [k for k, kind in enumerate(b.kinds) if kind == "detection"]
    assert det and all(b.phrase_labels[k] for k in det)
    assert b.targets.positive_map[b.targets.valid].sum(-1).min() > 0  # every real box grounds some token
    assert torch.all(b.targets.boxes[b.targets.valid][:, 2:] <= b.images.shape[-1])
