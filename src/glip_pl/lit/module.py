"""GLIPLitModule: the thin Lightning shell around ``glip_pl.model`` (training/validation steps, optimiser).

Optimiser and schedule as the official pretraining recipes (reference §5): AdamW, lr 1e-4, language backbone
1e-5, weight decay per recipe, optional official bias rule (every tensor whose name contains "bias": 2× lr, no
decay), linear warmup from 0.001 over 2000 steps, step decay ×0.1 at 67% / 89% of the run (cosine optional).
``schedule: autostep`` is the official fine-tune's auto-step (``SOLVER.USE_AUTOSTEP``, ``WarmupReduceLROnPlateau``):
the lr is multiplied by ``gamma`` whenever val box AP has not beaten its best by more than 1e-4 (absolute) for
``autostep_patience`` validations (official ``STEP_PATIENCE`` 3), with a cooldown of one validation after each decay
and before the first; rank 0's AP decides for every rank, and the state travels with the checkpoint.
The positive-count normaliser of the loss is averaged across ranks through ``strategy.reduce`` (the hook the
criterion exposes as ``reduce_mean``).

Reliability (issue 9): a step whose loss (on any rank) or gradients are NaN/Inf is skipped and counted
(``train/bad_steps``); ``max_bad_steps`` consecutive bad steps stop the run with the step and the checkpoint to
resume from. Bad samples skipped by the data pipeline are logged per reason (``data/skipped/<reason>``) and the
run stops when their fraction, summed over ranks so all ranks stop together, passes ``data.max_skip_fraction``.
The global RNG states travel with the checkpoint, so a resumed run draws the same dropout as an uninterrupted
one. ``GLIP_PL_RECORD_IDS=<file>`` appends each step's sample ids (one json line per step and rank): a debug
and test aid for exact-resume checks.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Optional

import lightning as L
import torch
from torch import Tensor

from glip_pl.model import build_glip
from glip_pl.model.types import GLIPInputError


SCHEDULES = ("step", "cosine", "constant", "autostep")
AUTOSTEP_COOLDOWN, AUTOSTEP_THRESHOLD = 1, 1e-4  # the official WarmupReduceLROnPlateau's constants


class GLIPLitModule(L.LightningModule):
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
        """``compile_head``: ``torch.compile`` the fusion head (VL-DyHead, most of the step's time) in place, so
        parameter names and checkpoints do not change; ``compile_options`` go to ``torch.compile`` (``mode``,
        ``dynamic``, ``backend``). Shapes vary with the image size and the prompt length: after the first
        recompile the compiler marks those dimensions dynamic. ``compile_step``: ``torch.compile`` the whole training
        forward + loss (``forward_loss``) instead, as one graph (no graph break or data-dependent host sync:
        tests/model/test_graph_breaks.py), with the same ``compile_options`` (default backend inductor); checkpoints
        do not change either. Validation stays eager. ``val_per_class``: also print each val category's AP
        (AP50, AP75, instances) and log it as ``val/AP_per_class/<category id>``."""
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
        self._compiled_forward_loss = None  # built on first use by compile_step
        self._val_gt: list = []
        self._val_dt: list = []
        self._t_last: Optional[float] = None
        self._bad_in_row = 0
        self._bad_total = 0
        self._bad_first = 0
        self.autostep_state = {"best": -math.inf, "bad": 0, "cooldown": AUTOSTEP_COOLDOWN, "stage": 0}

    # ------------------------------------------------------------------ distributed hook
    def _reduce_mean(self, value: Tensor) -> Tensor:
        """Average a normaliser across ranks (the positive-count all-reduce of the official loss)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.world_size == 1:
            return value
        return trainer.strategy.reduce(value.detach().clone(), reduce_op="mean")

    def configure_model(self):
        # FSDP2 shards here under ModelParallelStrategy (glip_pl.lit.strategies); other strategies: no-op
        from glip_pl.lit.strategies import configure_sharding

        configure_sharding(self)

    # ------------------------------------------------------------------ steps
    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device) if hasattr(batch, "to") else super().transfer_batch_to_device(batch, device, dataloader_idx)

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
        if not self._all_finite(total):
            self._bad_step(f"loss {float(total.detach())}")
            return None  # Lightning skips backward and the optimiser step (on every rank: the flag was reduced)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=bs, sync_dist=False)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        now = time.perf_counter()
        if self._t_last is not None:
            dt = now - self._t_last
            self.log("train/images_per_s", bs / dt, batch_size=bs)
            self.log("train/tokens_per_s", float(batch.text.attention_mask.sum()) / dt, batch_size=bs)
        self._t_last = now
        return total

    def on_before_optimizer_step(self, optimizer):
        for i, group in enumerate(optimizer.param_groups):
            self.log(f"lr/{group.get('name', i)}", group["lr"], rank_zero_only=True)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:  # the loss was not finite: training_step returned None, nothing to check
            return
        # gradients are already all-reduced (DDP), so every rank reaches the same verdict
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self._bad_step("gradients")
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
        else:
            self._bad_in_row = 0

    # ------------------------------------------------------------------ reliability
    def _all_finite(self, total: Tensor) -> bool:
        ok = torch.isfinite(total.detach()).all().float()
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:  # all ranks skip together or none does
            ok = trainer.strategy.reduce(ok.clone(), reduce_op="min")
        return bool(ok > 0)

    def _bad_step(self, what: str) -> None:
        step = self.global_step
        if self._bad_in_row == 0:
            self._bad_first = step
        self._bad_in_row += 1
        self._bad_total += 1
        print(f"[glip_pl] step {step}: non-finite {what}; step skipped ({self._bad_in_row} in a row)", flush=True)
        self.log("train/bad_steps", float(self._bad_total), rank_zero_only=True, batch_size=1)
        limit = int(self.hparams.get("max_bad_steps", 5) or 0)
        if limit and self._bad_in_row >= limit:
            from glip_pl.lit.checkpointing import find_resume_checkpoint

            trainer = self.trainer
            d = getattr(trainer.checkpoint_callback, "dirpath", None) or os.path.join(
                trainer.default_root_dir, "checkpoints")
            ck = find_resume_checkpoint(d, verbose=False)
            raise RuntimeError(
                f"{self._bad_in_row} consecutive training steps with non-finite {what} (steps {self._bad_first} to {step}, "
                f"limit model.max_bad_steps={limit}); resume from {ck or 'no valid checkpoint found in ' + str(d)} "
                "with a lower learning rate or after checking the data")

    def _check_skips(self, batch) -> None:
        """Log skipped samples per reason; stop every rank together when too many were skipped."""
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
        import numpy as np

        st = np.random.get_state()
        checkpoint["glip_pl_rng"] = {  # plain types and tensors only: loads with weights_only=True
            "torch": torch.get_rng_state(),
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [st[0], torch.from_numpy(st[1].astype("int64")), int(st[2]), int(st[3]), float(st[4])],
            "bad_in_row": self._bad_in_row, "bad_total": self._bad_total,
        }
        checkpoint["glip_pl_autostep"] = {k: float(v) for k, v in self.autostep_state.items()}
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            # Lightning writes rank 0's dict only: each rank's own RNG (its dropout stream) goes along
            from glip_pl.distributed import gather_objects, is_dist

            if is_dist():
                mine = {k: checkpoint["glip_pl_rng"][k] for k in ("torch", "python", "numpy")}
                checkpoint["glip_pl_rng"]["by_rank"] = gather_objects([mine])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # validate/test restore the weights but not the fit loop: keep the step for the printed AP line
        self._checkpoint_step = int(checkpoint.get("global_step", 0))
        auto = checkpoint.get("glip_pl_autostep")
        if auto:
            self.autostep_state = {"best": float(auto["best"]), "bad": int(auto["bad"]),
                                   "cooldown": int(auto["cooldown"]), "stage": int(auto["stage"])}
        st = checkpoint.get("glip_pl_rng")
        if not st:
            return
        import numpy as np

        by_rank = st.get("by_rank")
        trainer = getattr(self, "_trainer", None)
        if by_rank and trainer is not None and len(by_rank) == trainer.world_size:
            st = {**st, **by_rank[trainer.global_rank]}
        torch.set_rng_state(st["torch"])
        random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
        n = st["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype("uint32"), n[2], n[3], n[4]))
        self._bad_in_row, self._bad_total = int(st["bad_in_row"]), int(st["bad_total"])

    def validation_step(self, batch, batch_idx):
        outputs = self(batch)
        terms = self.model.loss(outputs, batch.targets)
        bs = len(batch)
        self.log("val/loss", self.model.criterion.total(terms), batch_size=bs, sync_dist=True)
        dets = self.model.postprocess(outputs, batch.phrase_maps, batch.image_sizes.tolist(), batch.orig_sizes.tolist(),
                                      score_thresh=self.hparams.eval_score_thresh)
        self._collect_for_ap(batch, dets)
        return dets

    # ------------------------------------------------------------------ COCO-style AP on the validation split
    def _collect_for_ap(self, batch, dets) -> None:
        """Keep GT (original pixels) and detections, labelled by the phrase's category, for box AP."""
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
        metrics = None
        if self.trainer.is_global_zero and gt:
            from glip_pl.lit.metrics import box_ap

            per_class = bool(self.hparams.get("val_per_class", False))
            names_of = getattr(self.trainer.datamodule, "val_category_names", None) if per_class else None
            metrics = box_ap(gt, dt, per_category=per_class, names=names_of() if names_of else None)
            where = f"step {self.global_step}"
            if self.trainer.state.fn != "fit" and hasattr(self, "_checkpoint_step"):
                where = f"checkpoint step {self._checkpoint_step}"  # validate/test --ckpt_path
            print(f"[glip_pl] {where}: val box AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}  "
                  f"AP75 {metrics['AP75']:.3f} on {len({g[0] for g in gt})} images", flush=True)
        if self.trainer.world_size > 1:
            # every rank logs rank 0's AP, so monitors (ModelCheckpoint, EarlyStopping, auto-step) agree on all ranks;
            # the other ranks would wait for rank 0 at the next step's gradient all-reduce anyway
            metrics = self.trainer.strategy.broadcast(metrics, src=0)
        if metrics is None:
            return
        self.last_val_metrics = metrics
        for k in ("AP", "AP50", "AP75"):
            self.log(f"val/{k}", float(metrics[k]))
        if metrics.get("per_category"):
            from glip_pl.eval.coco import format_per_category

            if self.trainer.is_global_zero:
                print(format_per_category(metrics["per_category"]), flush=True)
            for cat, m in metrics["per_category"].items():
                if m["AP"] is not None:
                    self.log(f"val/AP_per_class/{cat}", float(m["AP"]))
        if self.hparams.schedule == "autostep" and not self.trainer.sanity_checking:
            if self.autostep_update(float(metrics["AP"])):
                for conf in self.trainer.lr_scheduler_configs:  # apply now, not after the next optimiser step
                    sch = conf.scheduler
                    for group, base, fn in zip(sch.optimizer.param_groups, sch.base_lrs, sch.lr_lambdas):
                        group["lr"] = base * fn(sch.last_epoch)
            self.log("lr/autostep_stage", float(self.autostep_state["stage"]))

    def autostep_update(self, metric: float) -> bool:
        """One validation's AP into the official auto-step rule; True when the lr was just decayed."""
        st = self.autostep_state
        if metric > st["best"] + AUTOSTEP_THRESHOLD:
            st["best"], st["bad"] = metric, 0
        else:
            st["bad"] += 1
        if st["cooldown"] > 0:
            st["cooldown"] -= 1
            st["bad"] = 0
        if st["bad"] >= int(self.hparams.autostep_patience):
            st["stage"] += 1
            st["cooldown"], st["bad"] = AUTOSTEP_COOLDOWN, 0
            trainer = getattr(self, "_trainer", None)
            if trainer is None or trainer.is_global_zero:
                print(f"[glip_pl] step {self.global_step}: val AP has not improved on {st['best']:.4f} for "
                      f"{self.hparams.autostep_patience} validations: lr x{self.hparams.gamma} "
                      f"(stage {st['stage']})", flush=True)
            return True
        return False

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        hp = self.hparams
        groups: dict = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            lang = name.startswith("language_backbone.")
            lr = hp.lang_lr if lang else hp.lr
            wd = hp.weight_decay
            key = "language" if lang else "vision_head"
            if hp.official_bias_rule and "bias" in name:
                lr, wd, key = lr * hp.bias_lr_factor, 0.0, key + "_bias"
            g = groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": wd, "name": key})
            g["params"].append(p)
        optimizer = torch.optim.AdamW(list(groups.values()))
        total = self._total_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _total_steps(self) -> int:
        t = self.trainer
        if t.max_steps and t.max_steps > 0:
            return int(t.max_steps)
        try:
            return int(t.estimated_stepping_batches)
        except Exception as e:  # an infinite stream without max_steps
            raise GLIPInputError("set trainer.max_steps: the schedule needs the run's length") from e

    def _lr_lambda(self, total: int):
        hp = self.hparams
        warm = max(int(hp.warmup_steps), 0)
        marks = [round(m * total) for m in hp.milestones]

        def f(step: int) -> float:
            if step < warm:
                alpha = step / warm
                w = hp.warmup_factor * (1 - alpha) + alpha
            else:
                w = 1.0
            if hp.schedule == "step":
                return w * hp.gamma ** sum(step >= m for m in marks)
            if hp.schedule == "autostep":
                return w * hp.gamma ** self.autostep_state["stage"]
            if hp.schedule == "cosine":
                prog = min(max(step - warm, 0) / max(total - warm, 1), 1.0)
                return w * 0.5 * (1 + math.cos(math.pi * prog))
            return w

        return f
