"""TeacherStudentDataModule: gold sources + pseudo-labelled shards by weight (train), caption shards (predict).

The student's recipe lists its gold sources under ``data.train`` and the labelling job's output under
``data.pseudo`` (each with a weight, as any source); the train loader mixes them with the same weighted schedule as
``GroundingDataModule`` (GLIP-T / GLIP-L recipes). ``data.label`` holds a ``LabelConfig`` (as a dict): its
``predict_dataloader`` feeds the labelling job, each rank its own caption shards. A second round of self-training
is the same command with ``label.teacher`` pointing at the student's checkpoint folder (its ``last.ckpt``) and a
new ``label.output``.
"""

from __future__ import annotations

from typing import Optional

from ..lit.datamodule import GroundingDataModule, Source


class TeacherStudentDataModule(GroundingDataModule):
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

    def label_config(self):
        from .job import LabelConfig

        if not self.label_options:
            raise ValueError("TeacherStudentDataModule: set data.label (a pseudo-label config) to predict")
        return LabelConfig.from_dict(self.label_options)

    def predict_dataloader(self):
        """The labelling job's loader for this rank: its not-yet-labelled caption shards."""
        from .job import input_shards, load_teacher, make_predict_loader, rank_shards, resolve_teacher, todo_shards

        cfg = self.label_config()
        shards = input_shards(cfg)
        world, rank = self._world()
        out_split = cfg.output_split or cfg.split
        import os

        os.makedirs(cfg.output, exist_ok=True)
        todo = todo_shards(cfg.output, out_split, rank_shards(len(shards), rank, world))
        teacher = load_teacher(resolve_teacher(cfg.teacher))
        return make_predict_loader(cfg, shards, todo, teacher.tokenizer, teacher.cfg.max_text_len)
