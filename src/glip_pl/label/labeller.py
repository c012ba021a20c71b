"""``PseudoLabeller``: the LightningModule of the labelling run (``Trainer.predict`` on every rank).

``predict_step`` grounds a batch's phrases with the teacher, labels each caption (``record.label_caption``) and,
at the last batch of an input shard, writes its output shard. It returns the batch's counts (captions read,
labelled, boxes), which the progress bar shows; ``trainer.predict(return_predictions=False)`` keeps none of them.
"""

from __future__ import annotations

import lightning.pytorch as pl

from ..data.writer import shard_name
from .config import LabelConfig
from .record import label_caption
from .writer import ShardAccumulator, write_output_shard


class PseudoLabeller(pl.LightningModule):
    def __init__(self, teacher, cfg: LabelConfig, provenance: dict):
        super().__init__()
        self.teacher, self.cfg, self.provenance = teacher, cfg, provenance
        self.acc: dict = {}  # input shard position -> ShardAccumulator of the shard in progress

    def forward(self, images, prompts, orig_sizes):
        f = self.cfg.filters
        lowest = min(f.candidate_thresh, f.score_thresh, f.ignore_thresh if f.ignore_thresh is not None else 1.0)
        post = {"score_thresh": lowest, "detections_per_img": max(f.max_boxes, 1)}
        if f.nms_thresh is not None:
            post["nms_thresh"] = f.nms_thresh
        return self.teacher.predict(images, prompts, orig_sizes=orig_sizes, **post)

    def predict_step(self, batch, batch_idx, dataloader_idx=0) -> dict:
        from ..model.prompts import Prompt

        if self.trainer.received_sigterm:  # Lightning's handler only sets the flag; its predict loop never reads it
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException()
        i, items = batch["shard"], batch["items"]
        acc = self.acc.setdefault(i, ShardAccumulator())
        run = [it for it in items if it["spans"]]
        dets = {}
        if run:
            prompts = [Prompt(it["caption"], [[tuple(s) for s in sp] for sp in it["spans"]], it["names"])
                       for it in run]
            out = self([it["image"] for it in run], prompts, [it["orig"] for it in run])
            dets = {id(it): d for it, d in zip(run, out)}
        labelled = boxes = 0
        for it in items:
            lab = label_caption(it, dets.get(id(it)), self.cfg, self.provenance)
            acc.add(lab, it)
            if lab.record is not None:
                labelled, boxes = labelled + 1, boxes + len(lab.record["boxes"])
        for sid, reason in batch["skipped"]:
            acc.skip(sid, reason)
        if batch["last"]:
            self._write(i, batch["n_input"])
        return {"shard": i, "captions": len(items) + len(batch["skipped"]), "labelled": labelled, "boxes": boxes}

    def _write(self, i: int, n_input: int) -> None:
        acc = self.acc.pop(i)
        if acc.stats["input"] != n_input:  # pragma: no cover - a bug, never a data problem
            raise RuntimeError(f"shard {i}: accounted {acc.stats['input']} samples but read {n_input}")
        write_output_shard(self.cfg.output, shard_name(self.cfg.out_split, i), acc)
