"""Training callbacks: throughput, MFU and data-wait timing, EMA, gradient norm, W&B validation images, batch trace."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Optional

import lightning as L
import torch
from torch import Tensor
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class ThroughputMonitor(LightningThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` reduced to ``perf/images_per_s``, ``perf/mfu`` and the data-wait split over
    one window. FLOPs are counted once, on the first batch's shapes: with multi-scale images and prompts of varying
    length the MFU of other steps is approximate.

    Args:
        log_every_n_steps: the window: log over the last this many optimiser steps, every this many steps.
    """

    def __init__(self, log_every_n_steps: int = 10):
        super().__init__(batch_size_fn=len, window_size=max(int(log_every_n_steps), 1) + 1)
        self.every = max(int(log_every_n_steps), 1)
        self.flops_per_batch: Optional[int] = None
        self._counted = False
        self._step_t1: Optional[float] = None
        self._step_t0: Optional[float] = None
        self._pending_wait = 0.0
        self._split: deque = deque(maxlen=self.every)  # (data wait s, compute s)

    def _count_flops(self, trainer, pl_module, batch) -> None:
        from glip_pl.lit.flops import FlopsNotCounted, train_step_flops

        self._counted = True
        try:
            self.flops_per_batch = train_step_flops(pl_module.model, batch.images, batch.image_sizes, batch.text,
                                                    batch.targets)
            what = f"{self.flops_per_batch / 1e9:.3g} GFLOP per batch of {len(batch)} (forward + backward)"
        except FlopsNotCounted as e:
            what = f"FLOPs not counted ({e})"
        pl_module.flops_per_batch = self.flops_per_batch  # where Lightning's monitor reads them
        if self.flops_per_batch is None or not self.available_flops:
            device = trainer.strategy.root_device
            why = "no FLOP count" if self.flops_per_batch is None else f"the peak FLOP/s of {device} is unknown"
            print(f"[glip_pl] ThroughputMonitor: {what}; {why}: perf/mfu is not logged", file=sys.stderr, flush=True)
        else:
            print(f"[glip_pl] ThroughputMonitor: {what}; peak {self.available_flops / 1e12:.4g} TFLOP/s per device",
                  file=sys.stderr, flush=True)

    @rank_zero_only
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self._counted:
            self._count_flops(trainer, pl_module, batch)
        now = time.perf_counter()
        if self._step_t1 is not None:
            self._pending_wait = now - self._step_t1
        self._step_t0 = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()  # one clock reading ends this step and starts the next wait: steps tile time
            if self._step_t0 is not None and self._step_t1 is not None:
                self._split.append((self._pending_wait, now - self._step_t0))
            self._step_t1 = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @rank_zero_only
    def on_validation_end(self, trainer, *args):
        super().on_validation_end(trainer, *args)
        if self._step_t1 is not None and not trainer.sanity_checking:
            self._step_t1 = time.perf_counter()  # validation is not data wait (nor step time for Lightning's monitor)

    def _compute(self, trainer, iter_num: Optional[int] = None) -> None:
        if not trainer._logger_connector.should_update_logs or trainer.state.stage != RunningStage.TRAINING:
            return
        raw = self._throughputs[RunningStage.TRAINING].compute()
        rate = raw.get("samples_per_sec", raw.get("device/samples_per_sec"))
        if rate is None:
            return  # the window is not full yet: every logged row covers the same steps
        metrics = {"perf/images_per_s": rate}
        if "device/mfu" in raw:
            metrics["perf/mfu"] = raw["device/mfu"]
        if self._split:
            wait, compute = (sum(x) for x in zip(*self._split))
            metrics.update({"perf/data_wait_s": wait, "perf/compute_s": compute,
                            "perf/data_wait_fraction": wait / max(wait + compute, 1e-12)})
        if torch.cuda.is_available():
            metrics["perf/gpu_max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        # through the module: one logger row per step with the step's other metrics
        trainer.lightning_module.log_dict(metrics, rank_zero_only=True, batch_size=1)


class EMA(EMAWeightAveraging):
    """Official MODEL_EMA 0.999 over parameters and buffers, updated every step (Lightning's EMA callback).

    Args:
        decay: EMA decay per update.
        **kwargs: Lightning's ``EMAWeightAveraging`` arguments.
    """

    def __init__(self, decay: float = 0.999, **kwargs):
        super().__init__(decay=decay, **kwargs)


class GradNormMonitor(L.Callback):
    """Logs the global gradient 2-norm before clipping (``grad/norm_total``), the norm the clipping threshold sees.

    FSDP2: the norm of sharded DTensors is partial; its ``full_tensor()`` is a collective every rank runs. DeepSpeed
    ZeRO has no ``.grad`` before the step, so the engine's own ``get_global_grad_norm()`` is read after it (inf for
    an overflow-skipped step; no per-group norms).

    Args:
        every_n_steps: log every this many optimiser steps.
        per_group: also one norm per optimizer parameter group (``grad/norm_<group name>``).
    """

    def __init__(self, every_n_steps: int = 1, per_group: bool = True):
        self.every = max(int(every_n_steps), 1)
        self.per_group = per_group
        self.last_norm: Optional[float] = None
        self._taken_at: Optional[int] = None

    @staticmethod
    def total_norm(params) -> Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        sharded = [g for g in grads if hasattr(g, "full_tensor")]
        plain = [g for g in grads if not hasattr(g, "full_tensor")]
        parts = []
        if sharded:
            n = torch.nn.utils.get_total_norm(sharded, norm_type=2.0)
            parts.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
        if plain:
            parts.append(torch.nn.utils.get_total_norm(plain, norm_type=2.0))
        return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack([p.float() for p in parts]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % self.every:
            return
        from glip_pl.lit.guards import is_deepspeed

        if is_deepspeed(trainer) and not any(p.grad is not None for p in pl_module.parameters()):
            return  # ZeRO: read from the engine after the step (on_train_batch_end)
        total = self.total_norm(pl_module.parameters())
        self.last_norm, self._taken_at = float(total), trainer.global_step
        metrics = {"grad/norm_total": total}
        if self.per_group:
            for i, group in enumerate(optimizer.param_groups):
                metrics[f"grad/norm_{group.get('name', i)}"] = self.total_norm(group["params"])
        pl_module.log_dict(metrics, rank_zero_only=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from glip_pl.lit.guards import deepspeed_engine, is_deepspeed

        if not is_deepspeed(trainer) or (trainer.global_step - 1) % self.every:
            return  # global_step already counts the step just taken
        engine = deepspeed_engine(trainer)
        if engine is None or not engine.is_gradient_accumulation_boundary():
            return
        if self._taken_at == trainer.global_step - 1:
            return  # ZeRO stage 0 keeps .grad: taken before the step
        norm = engine.get_global_grad_norm()
        if norm is None:
            return
        self.last_norm = float(norm)
        pl_module.log("grad/norm_total", self.last_norm, rank_zero_only=True, batch_size=1)


def wandb_boxes(boxes, phrases, scores=None, max_boxes: int = 50) -> dict:
    """W&B ``boxes`` group: pixel boxes (x1, y1, x2, y2), one class per distinct phrase; scores let the UI filter."""
    names = sorted(set(phrases))
    ids = {p: i for i, p in enumerate(names)}
    data = []
    for k, (box, phrase) in enumerate(zip(list(boxes)[:max_boxes], phrases)):
        x1, y1, x2, y2 = (float(v) for v in box)
        item = {"position": {"minX": x1, "minY": y1, "maxX": x2, "maxY": y2}, "domain": "pixel",
                "class_id": ids[phrase], "box_caption": phrase}
        if scores is not None:
            s = float(scores[k])
            item["scores"] = {"score": s}
            item["box_caption"] = f"{phrase} {s:.2f}"
        data.append(item)
    return {"box_data": data, "class_labels": {i: p for p, i in ids.items()}}


def validation_image_panels(batch, detections, max_images: int = 4, score_thresh: float = 0.1,
                            max_boxes: int = 50) -> list:
    """Per image: the network input (HWC uint8, padding cut), true and predicted boxes, all in input pixels
    (``Detections`` come in original pixels)."""
    panels = []
    for b, det in enumerate(list(detections)[:max_images]):
        h, w = (int(v) for v in batch.image_sizes[b].tolist())
        oh, ow = (int(v) for v in batch.orig_sizes[b].tolist())
        image = batch.images[b, :, :h, :w].detach().cpu().permute(1, 2, 0).contiguous().numpy()
        names = list(batch.phrase_names[b]) or [str(i) for i in range(int(batch.phrase_maps[b].shape[0]))]
        valid = batch.targets.valid[b].detach().cpu()
        gt_boxes = batch.targets.boxes[b].detach().cpu()[valid].tolist()
        gt_phr = [names[int(p)] for p in batch.box_phrases[b].detach().cpu().tolist()][: len(gt_boxes)]
        keep = det.scores.detach().cpu() >= score_thresh
        scale = torch.tensor([w / ow, h / oh, w / ow, h / oh])
        pr_boxes = (det.boxes.detach().float().cpu()[keep] * scale).tolist()
        pr_scores = det.scores.detach().float().cpu()[keep].tolist()
        pr_phr = [names[int(p)] if int(p) < len(names) else str(int(p)) for p in det.labels.detach().cpu()[keep].tolist()]
        panels.append({
            "id": str(batch.ids[b]) if b < len(batch.ids) else str(b),
            "image": image,
            "caption": batch.captions[b] if b < len(batch.captions) and batch.captions[b] else "",
            "boxes": {"ground_truth": wandb_boxes(gt_boxes, gt_phr, max_boxes=max_boxes),
                      "predictions": wandb_boxes(pr_boxes, pr_phr, pr_scores, max_boxes=max_boxes)},
        })
    return panels


class ValidationImageLogger(L.Callback):
    """Logs validation images with true and predicted boxes to W&B. Rank 0's images only; a no-op without a
    ``WandbLogger``; ``validation_step`` must return the batch's ``Detections``.

    Args:
        every_n_val_steps: log from every this many validation batches.
        max_images: images logged from one batch.
        max_per_epoch: images logged per validation run.
        score_thresh: predicted boxes below this score are not drawn.
        max_boxes: boxes drawn per image and kind (true, predicted).
        key: W&B key of the images.
    """

    def __init__(self, every_n_val_steps: int = 10, max_images: int = 2, max_per_epoch: int = 8,
                 score_thresh: float = 0.1, max_boxes: int = 50, key: str = "val/examples"):
        self.every = max(int(every_n_val_steps), 1)
        self.max_images, self.max_per_epoch = max_images, max_per_epoch
        self.score_thresh, self.max_boxes, self.key = score_thresh, max_boxes, key
        self._logged = 0
        self.logged_total = 0

    @staticmethod
    def _wandb_logger(trainer):
        from lightning.pytorch.loggers import WandbLogger

        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._logged = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.is_global_zero or trainer.sanity_checking or batch_idx % self.every:
            return
        if self._logged >= self.max_per_epoch or not outputs:
            return
        logger = self._wandb_logger(trainer)
        if logger is None:
            return
        n = min(self.max_images, self.max_per_epoch - self._logged)
        panels = validation_image_panels(batch, outputs, n, self.score_thresh, self.max_boxes)
        if not panels:
            return
        logger.log_image(
            key=self.key, images=[p["image"] for p in panels], step=trainer.global_step,
            boxes=[p["boxes"] for p in panels],
            caption=[f"{p['id']}: {p['caption']}"[:200] for p in panels],
        )
        self._logged += len(panels)
        self.logged_total += len(panels)


def disable_dropout(module: torch.nn.Module) -> int:
    """Set every dropout probability to 0: ``nn.Dropout`` modules and the float ``dropout`` attributes that the
    fused-attention modules pass to ``scaled_dot_product_attention`` (text layer, fusion). Returns how many."""
    n = 0
    for m in module.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p, n = 0.0, n + 1
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout, n = 0.0, n + 1
    return n


class BatchTrace(L.Callback):
    """One JSON line per training batch and rank (``<out_dir>/batches-rank<R>.jsonl``): which samples each rank read.

    Args:
        out_dir: folder of the trace files.
        dump_first_batch: also save the first batch, loss, weights and gradients to ``<out_dir>/first-rank<R>.pt``.
        disable_dropout: dropout p=0 from fit start (masks differ for one batch of 2b and two of b: exact comparisons).
    """

    def __init__(self, out_dir: str, dump_first_batch: bool = False, disable_dropout: bool = False):
        self.out_dir = out_dir
        self.dump_first_batch = dump_first_batch
        self.disable_dropout = disable_dropout
        self._first: Optional[dict] = None

    def on_fit_start(self, trainer, pl_module):
        if self.disable_dropout:
            disable_dropout(pl_module)

    def _path(self, trainer, stem: str, ext: str):
        from pathlib import Path

        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        return Path(self.out_dir) / f"{stem}-rank{trainer.global_rank}.{ext}"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.dump_first_batch and self._first is None and not trainer.global_step:
            self._first = {"batch": batch, "state_dict": {k: v.detach().clone()
                                                          for k, v in pl_module.state_dict().items()}}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import json

        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        rec = {"rank": trainer.global_rank, "world_size": trainer.world_size, "node_rank": trainer.node_rank,
               "global_step": trainer.global_step, "ids": list(map(str, batch.ids)),
               "sources": list(map(str, batch.sources)),
               "loss": None if loss is None else float(loss.detach())}
        with open(self._path(trainer, "batches", "jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._first is not None and not self._first.get("saved"):
            # on_before_optimizer_step ran inside this step: loss, weights before the update and grads are known
            self._first.update(loss=rec["loss"], saved=True)
            torch.save({k: v for k, v in self._first.items() if k != "saved"}, self._path(trainer, "first", "pt"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._first is not None and "grad_norm" not in self._first:
            self._first["grad_norm"] = float(GradNormMonitor.total_norm(pl_module.parameters()))
            self._first["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                                    if p.grad is not None}
