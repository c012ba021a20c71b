"""GroundingDataModule: the weighted mix of shard sources (glip_pl.data) as a LightningDataModule.

Each rank reads its own shards; the loader's position travels with every checkpoint, so a resumed run continues
with the next unseen samples when world size and workers are unchanged. Validation raises on bad samples by
default, unlike training: a metric over silently fewer images would mislead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import lightning as L

from glip_pl.data import PromptConfig, SourceSpec, TransformConfig, build_loader
from glip_pl.model.language import build_tokenizer


@dataclass
class Source:
    """A source of the mix as written in a recipe."""

    urls: str  # a shard directory with index.json, a brace pattern, or a .tar
    weight: float = 1.0
    split: str = "train"
    name: Optional[str] = None
    kind: Optional[str] = None
    prompt_mode: Optional[str] = None  # "all": every class in id order, no negatives (fine-tuning, §3.1)
    # instead of index.json's names, e.g. [{"id": 1, "name": "ruby disc"}, ...]; every id the shards use is listed
    categories: Optional[list[dict]] = None
    # box regression and centerness weight (the token loss always counts fully): 0 lets pseudo labels name their
    # objects without teaching the box head their less exact placement
    box_loss_weight: float = 1.0

    def __post_init__(self):
        w = self.box_loss_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"source {self.urls!r}: box_loss_weight must be a number >= 0, got {w!r}")
        if self.categories is None:
            return
        if not isinstance(self.categories, (list, tuple)) or not self.categories:
            raise ValueError(f"source {self.urls!r}: categories must be a non-empty list of {{id, name}}")
        seen = set()
        for i, c in enumerate(self.categories):
            ok = isinstance(c, dict) and isinstance(c.get("id"), int) and not isinstance(c.get("id"), bool) \
                and isinstance(c.get("name"), str) and c["name"].strip()
            if not ok:
                raise ValueError(f"source {self.urls!r}: categories[{i}] must be {{id: int, name: non-empty text}}, "
                                 f"got {c!r}")
            if c["id"] in seen:
                raise ValueError(f"source {self.urls!r}: categories[{i}] repeats id {c['id']}")
            seen.add(c["id"])


class GroundingDataModule(L.LightningDataModule):
    """Training and validation loaders over a weighted mix of shard sources, resumable mid-epoch."""

    def __init__(
        self,
        train: Optional[list[Source]] = None,
        val: Optional[list[Source]] = None,
        batch_size: int = 2,
        val_batch_size: Optional[int] = None,
        num_workers: int = 2,
        seed: int = 0,
        train_min_sizes: tuple = (480, 560, 640, 720, 800),
        train_max_size: int = 1333,
        flip_prob: float = 0.5,
        val_size: int = 800,
        val_max_size: int = 1333,
        num_negatives: int = 85,
        max_text_len: int = 256,
        steps_per_epoch: Optional[int] = None,
        on_error: str = "skip",
        val_on_error: str = "raise",
        max_skip_fraction: Optional[float] = 0.01,
        skip_check_min_samples: int = 200,
        tokenizer: Optional[str] = None,
    ):
        """
        Args:
            train: training sources (``Source`` fields: ``urls``, ``weight``, ...); batches mix them by weight.
            val: validation sources (box AP, val loss); stored order, all-class prompts.
            batch_size: training images per batch and device.
            val_batch_size: validation images per batch and device (default: ``batch_size``).
            num_workers: data-loader worker processes per device (validation uses at most 1).
            seed: seed of the shard and sample shuffles and the prompt sampling.
            train_min_sizes: training short sides, one drawn per image (official MULT_MIN_SIZE_TRAIN).
            train_max_size: training long-side cap (MAX_SIZE_TRAIN).
            flip_prob: horizontal flip probability in training (left/right words swapped in captions).
            val_size: validation short side.
            val_max_size: validation long-side cap.
            num_negatives: detection prompts: negative classes sampled per image (official RANDOM_SAMPLE_NEG).
            max_text_len: prompt token limit (classes that do not fit are left out, captions truncated).
            steps_per_epoch: training batches per epoch (default: all sources' samples // (batch x world size)).
            on_error: a bad training sample: ``skip`` it (counted by reason) or ``raise``.
            val_on_error: a bad validation sample: ``raise`` (default) or ``skip``.
            max_skip_fraction: stop the run when more than this fraction of training samples was skipped (null: never).
            skip_check_min_samples: samples seen before ``max_skip_fraction`` is checked.
            tokenizer: a tokenizer folder, vocab.txt or cached model name (default: bundled bert-base-uncased).
        """
        super().__init__()
        self.train_sources = [s if isinstance(s, Source) else Source(**s) for s in (train or [])]
        self.val_sources = [s if isinstance(s, Source) else Source(**s) for s in (val or [])]
        if not self.train_sources and not self.val_sources:
            raise ValueError("GroundingDataModule: no data — set data.train (and data.val) sources in the recipe")
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.train_tf = TransformConfig(min_sizes=tuple(train_min_sizes), max_size=train_max_size, flip_prob=flip_prob)
        self.val_tf = TransformConfig.eval(val_size, val_max_size)
        self.prompts = PromptConfig(num_negatives=num_negatives, max_text_len=max_text_len)
        self.steps_per_epoch, self.on_error, self.val_on_error = steps_per_epoch, on_error, val_on_error
        if max_skip_fraction is not None and not 0 <= max_skip_fraction <= 1:
            raise ValueError(f"data.max_skip_fraction must be in [0, 1] (or null for no limit), got {max_skip_fraction}")
        self.max_skip_fraction, self.skip_check_min_samples = max_skip_fraction, int(skip_check_min_samples)
        self.tokenizer_name = tokenizer
        self._tokenizer = None
        self._train_loader = None
        self._pending_state: Optional[dict] = None
        self._check_sources()

    def _check_sources(self) -> None:
        """Fail before any GPU time is spent."""
        from glip_pl.data.pipeline import resolve_source

        for role, sources in (("train", self.train_sources), ("val", self.val_sources)):
            for i, s in enumerate(sources):
                try:
                    src = resolve_source(self._spec(s))
                except (ValueError, FileNotFoundError) as e:
                    raise ValueError(f"data.{role}[{i}] ({s.urls}): {e}") from None
                local = [u for u in src.urls if "://" not in u and not u.startswith("pipe:")]
                missing = [u for u in local if not os.path.exists(u)]
                if missing:
                    raise ValueError(f"data.{role}[{i}] ({s.urls}): {len(missing)} shard file(s) not found, "
                                     f"e.g. {missing[0]} — make the shards first (glip-pl shards ...)")

    @staticmethod
    def _spec(s: Source) -> SourceSpec:
        return SourceSpec(urls=s.urls, weight=s.weight, split=s.split, name=s.name, kind=s.kind,
                          prompt_mode=s.prompt_mode, box_loss_weight=float(s.box_loss_weight),
                          categories=[{"id": c["id"], "name": c["name"]} for c in s.categories] if s.categories else None)

    def val_category_names(self) -> dict:
        """{category id: name} of the val sources (their ``categories`` or index.json's; the first source wins)."""
        from glip_pl.data.pipeline import resolve_source

        names: dict = {}
        for s in self.val_sources:
            for c in resolve_source(self._spec(s)).categories or []:
                names.setdefault(int(c["id"]), str(c["name"]))
        return names

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def _world(self):
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def train_dataloader(self):
        if not self.train_sources:
            raise ValueError("GroundingDataModule: no data.train sources")
        world, rank = self._world()
        self._train_loader = build_loader(
            [self._spec(s) for s in self.train_sources], self.tokenizer, self.batch_size,
            num_workers=self.num_workers, seed=self.seed, train=True, world_size=world, rank=rank,
            transforms=self.train_tf, prompts=self.prompts, steps_per_epoch=self.steps_per_epoch,
            on_error=self.on_error,
        )
        if self._pending_state is not None:
            self._train_loader.load_state_dict(self._pending_state)
            self._pending_state = None
        return self._train_loader

    def val_dataloader(self):
        if not self.val_sources:
            return []
        world, rank = self._world()
        return build_loader(
            [self._spec(s) for s in self.val_sources], self.tokenizer, self.val_batch_size,
            num_workers=min(self.num_workers, 1), seed=self.seed, train=False, world_size=world, rank=rank,
            transforms=self.val_tf, prompts=PromptConfig(mode="all", max_text_len=self.prompts.max_text_len),
            on_error=self.val_on_error,
        )

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        """``glip-pl predict-batch`` detects on the val sources, with their all-class prompts."""
        return self.val_dataloader()

    def state_dict(self) -> dict:
        if self._train_loader is None:
            return {}
        # Lightning fetches one batch ahead while training: that batch has not been trained on yet.
        training = self.trainer is not None and self.trainer.training
        unconsumed = 1 if training and len(self._train_loader.history) > 0 else 0
        mine = self._train_loader.state_dict(unconsumed=unconsumed)
        out = {"train_loader": mine}
        world, _ = self._world()
        if world > 1:
            # Lightning keeps rank 0's copy only, and positions differ per rank (skips); a collective, run by every
            # rank inside trainer.save_checkpoint
            from glip_pl.distributed import gather_objects, is_dist

            if is_dist():
                out["train_loader_by_rank"] = gather_objects([mine])
        return out

    def load_state_dict(self, state: dict) -> None:
        st = state.get("train_loader")
        if st is None:
            return
        world, rank = self._world()
        by_rank = state.get("train_loader_by_rank")
        if by_rank and len(by_rank) == world and by_rank[rank].get("rank") == rank:
            st = by_rank[rank]
        if self._train_loader is not None:
            self._train_loader.load_state_dict(st)
        else:
            self._pending_state = st
