"""GLIPLitModule: the thin Lightning shell around ``glip_pl.model`` (training/validation steps, optimiser).

``GLIP_PL_RECORD_IDS=<file>`` appends each step's sample ids (a json line per step and rank): exact-resume checks.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import lightning as L
import torch
from torch import Tensor

from glip_pl.lit import optim
from glip_pl.lit.checkpointing import load_rng_state, save_rng_state
from glip_pl.lit.guards import NonFiniteGuard
from glip_pl.lit.optim import AUTOSTEP_COOLDOWN, AUTOSTEP_THRESHOLD, SCHEDULES  # noqa: F401 (re-exported)
from glip_pl.model import build_glip
from glip_pl.model.types import GLIPInputError


class GLIPLitModule(L.LightningModule):
    """A GLIP model (``glip_pl.model``) with its loss, AdamW optimiser, lr schedule and validation box AP."""

    def __init__(
        self,
        preset: str = "tiny",
        model_options: Optional[dict] = None,
        lr: float = 1e-4,
        lang_lr: float = 1e-5,
        weight_decay: float = 1e-4,
        official_bias_rule: bool = False,
        bias_lr_factor: float = 2.0,
        warmup_steps: int = 2000,
        warmup_factor: float = 0.001,
        schedule: str = "step",
        milestones: tuple = (0.67, 0.89),
        gamma: float = 0.1,
        autostep_patience: int = 3,
        init_weights: Optional[str] = None,
        eval_score_thresh: float = 0.05,
        val_per_class: bool = False,
        log_images_every_n_steps: int = 0,
        max_bad_steps: int = 5,
        compile_head: bool = False,
        compile_options: Optional[dict] = None,
        compile_step: bool = False,
    ):
        """
        Args:
            preset: model preset (``tiny``, ``glip_t_a``, ``glip_t``, ``glip_l``; ``glip_pl.model.presets``).
            model_options: ``build_glip`` keyword arguments on top of the preset (``use_sdpa``, ``swin__pretrained``).
            lr: AdamW learning rate of everything but the language backbone.
            lang_lr: learning rate of the language backbone (BERT).
            weight_decay: AdamW weight decay.
            official_bias_rule: every tensor named ``*bias*`` gets ``bias_lr_factor`` x lr and no decay (official).
            bias_lr_factor: lr factor of the biases under ``official_bias_rule``.
            warmup_steps: linear lr warmup length in optimiser steps.
            warmup_factor: lr factor at the first warmup step.
            schedule: lr after warmup: ``step``, ``cosine``, ``constant`` or ``autostep`` (lit/optim.py).
            milestones: ``step`` schedule: fractions of max_steps where the lr is multiplied by ``gamma``.
            gamma: lr factor at each milestone or auto-step decay.
            autostep_patience: ``autostep``: validations without an AP gain before the lr decays.
            init_weights: checkpoint whose model weights start the run (fine-tuning; loaded strictly).
            eval_score_thresh: validation detections below this score are dropped before box AP.
            val_per_class: also print each val category's AP and log it as ``val/AP_per_class/<id>``.
            log_images_every_n_steps: unused, kept so older recipes parse (images: ``ValidationImageLogger``).
            max_bad_steps: non-finite loss or gradient steps in a row that stop the run (0: never stop).
            compile_head: ``torch.compile`` the fusion head in place (checkpoint names unchanged; validation eager).
            compile_options: keyword arguments for ``torch.compile`` (``mode``, ``dynamic``, ``backend``).
            compile_step: ``torch.compile`` the whole training forward + loss as one graph; excludes ``compile_head``.
        """
        super().__init__()
        if schedule not in SCHEDULES:
            raise GLIPInputError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
        if int(autostep_patience) < 1:
            raise GLIPInputError(f"autostep_patience must be >= 1, got {autostep_patience}")
        self.save_hyperparameters()
        self.model = build_glip(preset, **(model_options or {}))
        if init_weights:
            from glip_pl.checkpoints import load_model_weights

            load_model_weights(self.model, init_weights, preset=preset)
        self.model.criterion.reduce_mean = self._reduce_mean
        if compile_head and compile_step:
            raise GLIPInputError("model.compile_head and model.compile_step exclude each other (compile_step "
                                 "compiles the head too, with the rest of the forward and the loss)")
        if compile_head:
            self.model.head.compile(**(compile_options or {}))
        self._compiled_forward_loss = None
        self._val_gt: list = []
        self._val_dt: list = []
        self._autostep = optim.AutoStep(autostep_patience)

    @property
    def autostep_state(self) -> dict:
        return self._autostep.state

    @autostep_state.setter
    def autostep_state(self, value: dict) -> None:
        self._autostep.state = value

    def _reduce_mean(self, value: Tensor) -> Tensor:
        """Not Lightning's ``strategy.reduce``: it runs a barrier first (a host block every step, and two graph
        breaks under ``compile_step``)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.world_size == 1:
            return value
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return value
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / dist.get_world_size()

    def configure_model(self):
        from glip_pl.lit.strategies import configure_sharding

        configure_sharding(self)

    def forward(self, batch):
        return self.model(batch.images, batch.image_sizes, batch.text)

    def forward_loss(self, images, image_sizes, text, targets) -> dict:
        """Model forward + the criterion's unweighted terms: what ``compile_step`` compiles."""
        return self.model.loss(self.model(images, image_sizes, text), targets)

    def _train_terms(self, batch) -> dict:
        fn = self.forward_loss
        if self.hparams.get("compile_step"):
            if self._compiled_forward_loss is None:
                self._compiled_forward_loss = torch.compile(fn, **(self.hparams.get("compile_options") or {}))
            fn = self._compiled_forward_loss
        return fn(batch.images, batch.image_sizes, batch.text, batch.targets)

    def training_step(self, batch, batch_idx):
        self._record_ids(batch)
        self._check_skips(batch)
        terms = self._train_terms(batch)
        total = self.model.criterion.total(terms)
        bs = len(batch)
        guard = self._guard()
        if guard is not None:
            checked = guard.check_loss(self.trainer, self, total)
            if checked is not total:  # skipped: None, or under DeepSpeed a loss that makes the engine skip
                return checked
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=bs, sync_dist=False)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        return total

    def configure_callbacks(self):
        """A ``NonFiniteGuard`` when the trainer has none, so plain ``Trainer`` runs are guarded too."""
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and any(isinstance(c, NonFiniteGuard) for c in trainer.callbacks):
            return []
        return [NonFiniteGuard()]

    def _guard(self) -> Optional[NonFiniteGuard]:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return None
        return next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)

    def _check_skips(self, batch) -> None:
        """Stop every rank together (counts summed over ranks) when too many samples were skipped."""
        totals = getattr(batch, "skip_totals", None)
        if not totals:
            return
        trainer = getattr(self, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        reasons = sorted(k for k in totals if k != "kept")
        for k in reasons:
            self.log(f"data/skipped/{k}", float(totals[k]), batch_size=1, reduce_fx="sum", sync_dist=False)
        limit = getattr(dm, "max_skip_fraction", None)
        if limit is None:
            return
        # per-sample skips against samples kept; "unreadable_shard" counts shard reads (the shuffle buffer reads
        # ahead, and the samples lost in a truncated tar are unknown), so it is logged but not in the fraction
        per_sample = [k for k in reasons if k != "unreadable_shard"]
        counts = torch.tensor([float(sum(totals[k] for k in per_sample)), float(totals.get("kept", 0))])
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts.to(self.device), reduce_op="sum").cpu()
        skipped, kept = float(counts[0]), float(counts[1])
        seen = skipped + kept
        if seen >= getattr(dm, "skip_check_min_samples", 0) and skipped > limit * seen:
            by = {k: int(totals[k]) for k in reasons}  # noqa: C416
            raise RuntimeError(
                f"too much bad data: {int(skipped)} of {int(seen)} samples skipped ({skipped / seen:.1%}) > "
                f"data.max_skip_fraction={limit} at step {self.global_step} (this rank, by reason: {by}); "
                "check the shards (glip-pl shards check) or raise data.max_skip_fraction")

    def _record_ids(self, batch) -> None:
        path = os.environ.get("GLIP_PL_RECORD_IDS")
        if path:
            rank = self.global_rank
            with open(path if rank == 0 else f"{path}.rank{rank}", "a") as f:
                f.write(json.dumps({"step": int(self.global_step), "rank": rank, "ids": [f"{s}/{i}" for s, i in zip(batch.sources, batch.ids)]}) + "\n")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_rng_state(checkpoint, getattr(self, "_trainer", None))
        checkpoint["glip_pl_autostep"] = self._autostep.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # validate/test restore the weights but not the fit loop: keep the step for the printed AP line
        self._checkpoint_step = int(checkpoint.get("global_step", 0))
        auto = checkpoint.get("glip_pl_autostep")
        if auto:
            self._autostep.load_state_dict(auto)
        load_rng_state(checkpoint, getattr(self, "_trainer", None))

    def validation_step(self, batch, batch_idx):
        outputs = self(batch)
        terms = self.model.loss(outputs, batch.targets)
        bs = len(batch)
        self.log("val/loss", self.model.criterion.total(terms), batch_size=bs, sync_dist=True)
        dets = self.model.postprocess(outputs, batch.phrase_maps, batch.image_sizes.tolist(), batch.orig_sizes.tolist(),
                                      score_thresh=self.hparams.eval_score_thresh)
        self._collect_for_ap(batch, dets)
        return dets

    def predict_step(self, batch, batch_idx, dataloader_idx=0) -> list:
        """``glip-pl predict-batch``: one record per image (``glip_pl.lit.prediction_writer`` writes them)."""
        dets = self.model.postprocess(self(batch), batch.phrase_maps, batch.image_sizes.tolist(),
                                      batch.orig_sizes.tolist(), score_thresh=self.hparams.eval_score_thresh)
        out = []
        for b, det in enumerate(dets):
            names, labels = list(batch.phrase_names[b]), list(batch.phrase_labels[b])
            phrase = [int(p) for p in det.labels.tolist()]
            out.append({"id": str(batch.ids[b]), "source": str(batch.sources[b]),
                        "height": int(batch.orig_sizes[b, 0]), "width": int(batch.orig_sizes[b, 1]),
                        "boxes": [[round(v, 2) for v in box] for box in det.boxes.detach().float().cpu().tolist()],
                        "scores": [round(v, 4) for v in det.scores.detach().float().cpu().tolist()],
                        "labels": [int(labels[p]) for p in phrase],
                        "phrases": [names[p] if p < len(names) else str(p) for p in phrase]})
        return out

    def _collect_for_ap(self, batch, dets) -> None:
        for b, det in enumerate(dets):
            sx = float(batch.orig_sizes[b, 1]) / float(batch.image_sizes[b, 1])
            sy = float(batch.orig_sizes[b, 0]) / float(batch.image_sizes[b, 0])
            labels = batch.phrase_labels[b]
            m = batch.targets.valid[b]
            gt_boxes = batch.targets.boxes[b][m].detach().float().cpu() * torch.tensor([sx, sy, sx, sy])
            gt_phr = batch.box_phrases[b].tolist()
            self._val_gt.append((batch.ids[b], tuple(batch.orig_sizes[b].tolist()), gt_boxes.tolist(),
                                 [int(labels[p]) for p in gt_phr]))
            self._val_dt.append((batch.ids[b], det.boxes.detach().float().cpu().tolist(),
                                 det.scores.detach().float().cpu().tolist(),
                                 [int(labels[int(p)]) for p in det.labels.tolist()]))

    def on_validation_epoch_start(self):
        self._val_gt, self._val_dt = [], []

    def on_validation_epoch_end(self):
        gt, dt = self._val_gt, self._val_dt
        if self.trainer.world_size > 1:
            from glip_pl.distributed import gather_objects

            gt, dt = gather_objects(gt), gather_objects(dt)
        metrics, shown = None, False
        if self.trainer.is_global_zero and gt:
            from glip_pl.lit.metrics import box_ap

            per_class = bool(self.hparams.get("val_per_class", False))
            names_of = getattr(self.trainer.datamodule, "val_category_names", None) if per_class else None
            metrics = box_ap(gt, dt, per_category=per_class, names=names_of() if names_of else None)
            shown = self._print_ap(metrics, len({g[0] for g in gt}))
        if self.trainer.world_size > 1:
            # monitors (ModelCheckpoint, EarlyStopping, auto-step) must agree on all ranks; the others would wait
            # for rank 0 at the next step's gradient all-reduce anyway
            metrics = self.trainer.strategy.broadcast(metrics, src=0)
        if metrics is None:
            return
        self.last_val_metrics = metrics
        for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):  # eval.coco.METRIC_NAMES
            if metrics[k] >= 0:  # COCO's -1: no ground truth in that size range
                self.log(f"val/{k}", float(metrics[k]))
        if metrics.get("per_category"):
            from glip_pl.eval.coco import format_per_category

            if shown:
                print(format_per_category(metrics["per_category"]), flush=True)
            for cat, m in metrics["per_category"].items():
                if m["AP"] is not None:
                    self.log(f"val/AP_per_class/{cat}", float(m["AP"]))
        if self.hparams.schedule == "autostep" and not self.trainer.sanity_checking:
            if self.autostep_update(float(metrics["AP"])):
                optim.reapply_lambdas(self.trainer.lr_scheduler_configs)  # now, not after the next optimiser step
            self.log("lr/autostep_stage", float(self.autostep_state["stage"]))

    def _print_ap(self, metrics: dict, images: int) -> bool:
        trainer = self.trainer
        where = f"step {self.global_step}"
        if trainer.state.fn != "fit" and hasattr(self, "_checkpoint_step"):
            where = f"checkpoint step {self._checkpoint_step}"  # validate/test --ckpt_path
        note = ""
        if trainer.sanity_checking:
            ran, full = sum(trainer.num_sanity_val_batches), sum(trainer.num_val_batches)
            if ran < full:  # a few batches to catch a broken val loop early: their AP measures nothing
                print(f"[glip_pl] sanity check passed: validation ran on {images} images ({ran} of {full} val "
                      "batches); no AP for a partial pass", flush=True)
                return False
            note = " (sanity check on every val batch: the starting weights)"
        print(f"[glip_pl] {where}: val box AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}  "
              f"AP75 {metrics['AP75']:.3f} on {images} images{note}", flush=True)
        return True

    def autostep_update(self, metric: float) -> bool:
        """True when this validation's AP just decayed the lr (official auto-step rule)."""
        decayed = self._autostep.update(metric)
        if decayed:
            st = self._autostep.state
            trainer = getattr(self, "_trainer", None)
            if trainer is None or trainer.is_global_zero:
                print(f"[glip_pl] step {self.global_step}: val AP has not improved on {st['best']:.4f} for "
                      f"{self.hparams.autostep_patience} validations: lr x{self.hparams.gamma} "
                      f"(stage {st['stage']})", flush=True)
        return decayed

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(optim.param_groups(self.model, hp.lr, hp.lang_lr, hp.weight_decay,
                                                         hp.official_bias_rule, hp.bias_lr_factor))
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda(optim.total_steps(self.trainer)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_lambda(self, total: int):
        hp = self.hparams
        return optim.lr_lambda(total, hp.schedule, hp.warmup_steps, hp.warmup_factor, hp.milestones, hp.gamma,
                               autostep_stage=lambda: self._autostep.state["stage"])
