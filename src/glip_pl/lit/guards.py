"""Non-finite guard: a step whose loss (on any rank) or gradients are NaN/Inf is skipped and counted.

Single process, DDP, FSDP2: ``training_step`` returns None for a non-finite loss (Lightning skips backward and AdamW
leaves gradient-less parameters alone); non-finite gradients are set to None. FSDP2 ranks see only their shard, so
that verdict is all-reduced. DeepSpeed: Lightning refuses a None and ZeRO keeps the gradients in its own
partitions, so a non-finite loss becomes one that gives every parameter a NaN gradient and DeepSpeed's own overflow
check (ZeRO 1/2/3 in fp32, bf16 with ``check_grad_overflow``, fp16) skips the step; ``engine.was_step_applied()``
confirms it. ZeRO stage 0 in fp32 has no such check: the run stops.
"""

from __future__ import annotations

import os
from typing import Optional

import lightning as L
import torch
from torch import Tensor


def is_deepspeed(trainer) -> bool:
    return type(getattr(trainer, "strategy", None)).__name__ == "DeepSpeedStrategy"


def deepspeed_engine(trainer):
    """The ``DeepSpeedEngine`` Lightning wraps the module in (``trainer.model``), or None."""
    model = getattr(trainer, "model", None)
    return model if model is not None and hasattr(model, "was_step_applied") else None


def deepspeed_can_skip(engine) -> bool:
    """Whether this engine skips a step whose gradient norm is not finite (see the module docstring)."""
    if engine.fp16_enabled():
        return True
    if engine.bfloat16_enabled():
        cfg = getattr(getattr(engine, "_config", None), "bfloat16_config", None)
        return bool(getattr(cfg, "check_grad_overflow", True))
    return engine.zero_optimization_stage() > 0


def all_ranks_true(flag: bool, device) -> bool:
    """``flag`` and-ed over ranks: one all-reduce, no barrier (``strategy.reduce`` adds one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def local_grads(params) -> list:
    """The gradients this rank holds: a DTensor's local shard (FSDP2), else the tensor itself."""
    out = []
    for p in params:
        g = p.grad
        if g is not None:
            out.append(g.to_local() if hasattr(g, "to_local") else g)
    return out


class NonFiniteGuard(L.Callback):
    """Skips and counts steps with a non-finite loss or gradients; ``max_bad_steps`` in a row stop the run.

    Args:
        max_bad_steps: bad steps in a row that stop the run (None: ``model.max_bad_steps``, default 5; 0: never).
        verbose: print a line for each skipped step.
    """

    def __init__(self, max_bad_steps: Optional[int] = None, verbose: bool = True):
        self.max_bad_steps = max_bad_steps
        self.verbose = verbose
        self.bad_in_row = 0
        self.bad_total = 0
        self.bad_first = 0
        self._skip_pending: Optional[str] = None  # DeepSpeed: a skip was asked for; verified after the step
        self._said_deepspeed = False

    def check_loss(self, trainer, pl_module, total: Tensor) -> Optional[Tensor]:
        """What ``training_step`` returns: ``total`` when finite on every rank, else None or (DeepSpeed) a NaN loss."""
        ok = all_ranks_true(bool(torch.isfinite(total.detach()).all()), total.device)
        if ok:
            return total
        what = f"loss {float(total.detach())}"
        engine = deepspeed_engine(trainer) if is_deepspeed(trainer) else None
        if engine is None:
            self.bad_step(trainer, pl_module, what)
            return None  # Lightning skips backward and the optimiser step (on every rank: the flag was reduced)
        if not deepspeed_can_skip(engine):
            raise RuntimeError(
                f"non-finite {what} at step {pl_module.global_step}: this DeepSpeed configuration (ZeRO stage 0, "
                f"fp32) cannot skip a step; resume from {self._resume_hint(trainer)} with a lower learning rate, "
                "after checking the data, or with a ZeRO stage >= 1")
        self.bad_step(trainer, pl_module, what)
        self._skip_pending = what
        # every trainable parameter gets a NaN gradient: the engine's overflow check then skips the step on every
        # rank, and ZeRO's gradient reduction sees the same parameters as in a good step
        anchor = sum(p.sum() for p in pl_module.parameters() if p.requires_grad)
        return anchor * float("nan")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grads = local_grads(params)
        if is_deepspeed(trainer):
            if not grads and not self._said_deepspeed and trainer.is_global_zero:
                print("[glip_pl] NonFiniteGuard: under DeepSpeed ZeRO the gradients are not visible before the step; "
                      "non-finite gradients are left to DeepSpeed's overflow check and counted after the step",
                      flush=True)
            self._said_deepspeed = True
            if not grads:
                return
        sharded = any(hasattr(p.grad, "to_local") for p in params if p.grad is not None)
        if not grads and not sharded:  # the loss was not finite: training_step returned None, nothing to check
            return
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if sharded:  # FSDP2: this rank saw its shard only
            finite = all_ranks_true(finite, pl_module.device)
        if not finite:
            self.bad_step(trainer, pl_module, "gradients")
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
        elif not is_deepspeed(trainer):
            self.bad_in_row = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not is_deepspeed(trainer):
            return
        engine = deepspeed_engine(trainer)
        if engine is None or not engine.is_gradient_accumulation_boundary():
            return
        applied = engine.was_step_applied()
        if self._skip_pending is not None:
            what, self._skip_pending = self._skip_pending, None
            if applied:  # never expected: the guard relies on the engine's overflow skip
                raise RuntimeError(
                    f"non-finite {what} at step {pl_module.global_step}: DeepSpeed applied the step anyway; "
                    f"resume from {self._resume_hint(trainer)}")
        elif not applied:
            self.bad_step(trainer, pl_module, "gradients (DeepSpeed overflow check)")
        else:
            self.bad_in_row = 0

    def limit(self, pl_module) -> int:
        if self.max_bad_steps is not None:
            return int(self.max_bad_steps)
        return int(getattr(pl_module, "hparams", {}).get("max_bad_steps", 5) or 0)

    def bad_step(self, trainer, pl_module, what: str) -> None:
        step = pl_module.global_step
        if self.bad_in_row == 0:
            self.bad_first = step
        self.bad_in_row += 1
        self.bad_total += 1
        if self.verbose:
            print(f"[glip_pl] step {step}: non-finite {what}; step skipped ({self.bad_in_row} in a row)", flush=True)
        pl_module.log("train/bad_steps", float(self.bad_total), rank_zero_only=True, batch_size=1)
        limit = self.limit(pl_module)
        if limit and self.bad_in_row >= limit:
            raise RuntimeError(
                f"{self.bad_in_row} consecutive training steps with non-finite {what} (steps {self.bad_first} to "
                f"{step}, limit model.max_bad_steps={limit}); resume from {self._resume_hint(trainer)} "
                "with a lower learning rate or after checking the data")

    @staticmethod
    def _resume_hint(trainer) -> str:
        from glip_pl.lit.checkpointing import find_resume_checkpoint

        d = getattr(trainer.checkpoint_callback, "dirpath", None) or os.path.join(
            trainer.default_root_dir, "checkpoints")
        return find_resume_checkpoint(d, verbose=False) or f"no valid checkpoint found in {d}"

    def state_dict(self) -> dict:
        return {"bad_in_row": self.bad_in_row, "bad_total": self.bad_total, "bad_first": self.bad_first}

    def load_state_dict(self, state_dict: dict) -> None:
        self.bad_in_row = int(state_dict.get("bad_in_row", 0))
        self.bad_total = int(state_dict.get("bad_total", 0))
        self.bad_first = int(state_dict.get("bad_first", 0))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        # older checkpoints kept the counters with the RNG state; load_state_dict (called after this) wins
        old = checkpoint.get("glip_pl_rng") or {}
        if "bad_in_row" in old:
            self.bad_in_row, self.bad_total = int(old["bad_in_row"]), int(old["bad_total"])
