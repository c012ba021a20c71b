"""Data modules of the teacher–student loop: the labelling job's predict loader (each rank its own unfinished caption
shards) and ``TeacherStudentDataModule``: the student's gold sources (``data.train``) and pseudo-labelled shards
(``data.pseudo``) mixed by weight as in ``GroundingDataModule``, with ``data.label`` (a ``LabelConfig``) for its
predict loader."""

from __future__ import annotations

import logging
import os
from typing import Optional

import lightning.pytorch as pl

from ..lit.datamodule import GroundingDataModule, Source
from .config import LabelConfig

log = logging.getLogger(__name__)


def listed_captions(cfg: LabelConfig, shards: list, todo: list) -> Optional[int]:
    """Input captions in the shards ``todo`` by the input folder's ``index.json``; None when it does not list them."""
    from ..data.shard_index import read_index

    if not os.path.isdir(cfg.input):
        return None
    listed = (read_index(cfg.input).get("splits") or {}).get(cfg.split) or {}
    counts = {s.get("name"): s.get("count") for s in listed.get("shards") or [] if isinstance(s, dict)}
    found = [counts.get(os.path.basename(shards[i])) for i in todo]
    return sum(found) if all(isinstance(c, int) for c in found) else None


class CaptionPredictData:
    """The labelling job's ``predict_dataloader``: this rank's input shards not finished by an earlier run.

    Sets ``todo`` (their positions) and ``captions_todo`` (their captions, when the input index lists them).
    ``teacher_text``: (tokenizer, max_text_len) when the caller holds the teacher; else read from its checkpoint.
    """

    label_options: dict
    teacher_text: Optional[tuple] = None

    def label_config(self) -> LabelConfig:
        if isinstance(self.label_options, LabelConfig):
            return self.label_options
        if not self.label_options:
            raise ValueError(f"{type(self).__name__}: set data.label (a pseudo-label config) to predict")
        return LabelConfig.from_dict(self.label_options)

    def predict_dataloader(self):
        from .plan import rank_shards, todo_shards
        from .reader import input_shards, make_predict_loader
        from .teacher import read_teacher_text, resolve_teacher

        cfg = self.label_config()
        shards = input_shards(cfg)
        t = self.trainer
        world, rank = (t.world_size, t.global_rank) if t is not None else (1, 0)
        os.makedirs(cfg.output, exist_ok=True)
        mine = rank_shards(len(shards), rank, world)
        self.todo = todo_shards(cfg.output, cfg.out_split, mine)
        if len(self.todo) < len(mine):
            log.warning("rank %d: resuming, %d of its %d shards already labelled", rank, len(mine) - len(self.todo),
                        len(mine))
        self.captions_todo = listed_captions(cfg, shards, self.todo)
        tokenizer, max_text_len = self.teacher_text or read_teacher_text(resolve_teacher(cfg.teacher))
        return make_predict_loader(cfg, shards, self.todo, tokenizer, max_text_len)


class LabelDataModule(CaptionPredictData, pl.LightningDataModule):
    """The labelling job's data: predict only."""

    def __init__(self, label: LabelConfig, teacher_text: Optional[tuple] = None):
        super().__init__()
        self.label_options, self.teacher_text = label, teacher_text


class TeacherStudentDataModule(CaptionPredictData, GroundingDataModule):
    """A ``GroundingDataModule`` whose training mix adds pseudo-labelled sources, and whose predict loader feeds
    the labelling job."""

    def __init__(self, train: Optional[list] = None, pseudo: Optional[list] = None, label: Optional[dict] = None,
                 **kwargs):
        """
        Args:
            train: gold sources (as ``GroundingDataModule``'s ``train``).
            pseudo: the labelling job's output shards, sources of kind ``grounding`` by default, mixed by weight.
            label: a pseudo-label config (``glip_pl.label.job.LabelConfig`` as a dict) for ``predict``.
            **kwargs: the other ``GroundingDataModule`` arguments.
        """
        self.pseudo_sources = [s if isinstance(s, Source) else Source(**s) for s in (pseudo or [])]
        for s in self.pseudo_sources:
            s.kind = s.kind or "grounding"
        gold = [s if isinstance(s, Source) else Source(**s) for s in (train or [])]
        super().__init__(train=gold + self.pseudo_sources, **kwargs)
        self.gold_sources = gold
        self.label_options = dict(label or {})
