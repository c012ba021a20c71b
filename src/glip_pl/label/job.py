"""The pseudo-labelling job: a teacher GLIP grounds the noun phrases of caption shards (GLIP §3.3, reference §3.4).

One Lightning ``predict`` run over every rank and node; rank r of W labels input shards r, r+W, ... (no sampler:
a shard is the unit of work, written by exactly one rank). For each input shard the job writes one grounding shard
of the same position (``<output>/<split>-%06d.tar``, the shards schema: ``boxes``, ``spans`` per box, ``scores``,
``provenance``), complete when named, with its accounting beside it. A killed job restarted with the same plan
skips finished shards; SIGTERM stops the job before its next batch (exit status 143). Every input sample is either
labelled or counted as skipped with its reason, so ``input == labelled + skipped`` holds per shard and in
``index.json``. Skip reasons: ``bad_record`` (unreadable json / missing fields), ``non_text_caption``,
``empty_caption``, ``undecodable_image``, ``no_phrase``, ``too_few_boxes``, ``unboxed_phrase``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import torch

from ..data.writer import shard_name
from ..distributed import launch_rank_world
from .config import LabelConfig


def provenance_of(cfg: LabelConfig, teacher_path: str, teacher_sha: str, teacher, spacy_info: dict) -> dict:
    import glip_pl

    f = cfg.filters
    return {"teacher": os.path.abspath(teacher_path), "teacher_sha256": teacher_sha,
            "teacher_config": {k: v for k, v in (teacher.cfg.to_dict().items() if hasattr(teacher.cfg, "to_dict")
                                                  else []) if isinstance(v, (int, float, str, bool)) or v is None},
            "score_thresh": f.score_thresh, "nms_thresh": f.nms_thresh, "top_k": f.top_k, "min_boxes": f.min_boxes,
            "max_boxes": f.max_boxes, "unboxed_phrase": f.unboxed_phrase, "cross_phrase_nms": f.cross_phrase_nms,
            "ignore_thresh": f.ignore_thresh, "ignore_overlap": f.ignore_overlap,
            "min_size": cfg.min_size, "max_size": cfg.max_size,
            "spacy_model": cfg.phrases.model, "spacy_model_meta": spacy_info, "phrase_options": cfg.phrases.to_dict(),
            "glip_pl": glip_pl.__version__}


def make_trainer(cfg: LabelConfig, trainer_kwargs: Optional[dict] = None):
    import lightning.pytorch as pl

    from .progress import CaptionProgressBar

    gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if gpu else "32-true")
    kw = dict(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
              precision=precision, logger=False, enable_checkpointing=False, enable_model_summary=False,
              use_distributed_sampler=False, inference_mode=True)
    kw.update(trainer_kwargs or {})
    if kw.get("enable_progress_bar", True):
        kw["callbacks"] = [*kw.get("callbacks", []), CaptionProgressBar()]
    return pl.Trainer(**kw)


def run_label(cfg: LabelConfig, trainer_kwargs: Optional[dict] = None) -> dict:
    """Run the labelling job (this process's rank); returns {"entry": index entry or None, "done": shards}."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from .datamodule import LabelDataModule
    from .labeller import PseudoLabeller
    from .phrases import load_nlp, model_info
    from .plan import check_plan, plan_hash
    from .reader import input_shards
    from .summary import finalize, format_summary, log_wandb
    from .teacher import file_sha256, load_teacher, resolve_teacher

    cfg.check()
    teacher_path = resolve_teacher(cfg.teacher)
    teacher = load_teacher(teacher_path)  # a wrong kind of file fails here, before any work
    nlp_info = model_info(load_nlp(cfg.phrases.model))  # a missing spaCy model fails here too
    teacher_sha = file_sha256(teacher_path)
    shards = input_shards(cfg)
    os.makedirs(cfg.output, exist_ok=True)
    phash = plan_hash(cfg, shards, teacher_sha)
    check_plan(cfg.output, phash, cfg.overwrite, write=launch_rank_world()[0] == 0)
    provenance = provenance_of(cfg, teacher_path, teacher_sha, teacher, nlp_info)

    trainer = make_trainer(cfg, trainer_kwargs)
    dm = LabelDataModule(cfg, teacher_text=(teacher.tokenizer, teacher.cfg.max_text_len))
    try:
        trainer.predict(PseudoLabeller(teacher, cfg, provenance), datamodule=dm, return_predictions=False)
    except SIGTERMException:  # finished shards are final; the shard in progress is labelled again on resume
        done = sum(os.path.exists(os.path.join(cfg.output, shard_name(cfg.out_split, i))) for i in range(len(shards)))
        print(f"pseudo-label: stopped by SIGTERM (rank {trainer.global_rank}); {done} of {len(shards)} shards are "
              "finished; run the same command again to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM) from None
    trainer.strategy.barrier("pseudo-label-done")
    entry = None
    if trainer.global_rank == 0:
        entry = finalize(cfg, len(shards), provenance, phash)
        if entry is None:
            print(f"pseudo-label: not all {len(shards)} shards are finished yet (other ranks/jobs still running)")
        else:
            print(format_summary(entry), flush=True)
            if cfg.wandb:
                folder = log_wandb(cfg, entry)
                if folder:
                    print(f"pseudo-label: quality summary logged to W&B ({folder})", flush=True)
    return {"entry": entry, "done": getattr(dm, "todo", [])}
