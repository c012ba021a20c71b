"""Optimiser and learning-rate schedules of the official pretraining and fine-tune recipes (reference §5).

``autostep`` is the official fine-tune's ``WarmupReduceLROnPlateau`` (``SOLVER.USE_AUTOSTEP``): x``gamma`` when val
AP has not beaten its best by 1e-4 (absolute) for ``patience`` validations, with one validation of cooldown after
each decay and before the first.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from glip_pl.model.types import GLIPInputError


SCHEDULES = ("step", "cosine", "constant", "autostep")
AUTOSTEP_COOLDOWN, AUTOSTEP_THRESHOLD = 1, 1e-4  # the official WarmupReduceLROnPlateau's constants


def param_groups(model: torch.nn.Module, lr: float, lang_lr: float, weight_decay: float,
                 official_bias_rule: bool = False, bias_lr_factor: float = 2.0) -> list:
    """AdamW parameter groups named ``vision_head`` / ``language`` (+ ``_bias`` under the official bias rule)."""
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lang = name.startswith("language_backbone.")
        g_lr = lang_lr if lang else lr
        wd = weight_decay
        key = "language" if lang else "vision_head"
        if official_bias_rule and "bias" in name:
            g_lr, wd, key = g_lr * bias_lr_factor, 0.0, key + "_bias"
        g = groups.setdefault(key, {"params": [], "lr": g_lr, "weight_decay": wd, "name": key})
        g["params"].append(p)
    return list(groups.values())


def total_steps(trainer) -> int:
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        return int(trainer.estimated_stepping_batches)
    except Exception as e:  # an infinite stream without max_steps
        raise GLIPInputError("set trainer.max_steps: the schedule needs the run's length") from e


def lr_lambda(total: int, schedule: str = "step", warmup_steps: int = 2000, warmup_factor: float = 0.001,
              milestones=(0.67, 0.89), gamma: float = 0.1,
              autostep_stage: Optional[Callable[[], int]] = None) -> Callable[[int], float]:
    """The lr multiplier per optimiser step (for ``LambdaLR``). ``autostep_stage()`` is read at every call, so an
    auto-step decay takes effect as soon as the scheduler's lambdas are re-evaluated."""
    if schedule not in SCHEDULES:
        raise GLIPInputError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
    warm = max(int(warmup_steps), 0)
    marks = [round(m * total) for m in milestones]

    def f(step: int) -> float:
        if step < warm:
            alpha = step / warm
            w = warmup_factor * (1 - alpha) + alpha
        else:
            w = 1.0
        if schedule == "step":
            return w * gamma ** sum(step >= m for m in marks)
        if schedule == "autostep":
            return w * gamma ** (autostep_stage() if autostep_stage else 0)
        if schedule == "cosine":
            prog = min(max(step - warm, 0) / max(total - warm, 1), 1.0)
            return w * 0.5 * (1 + math.cos(math.pi * prog))
        return w

    return f


class AutoStep:
    """The official plateau rule's state: best AP, validations without a gain, cooldown left, decays so far."""

    def __init__(self, patience: int = 3):
        if int(patience) < 1:
            raise GLIPInputError(f"autostep_patience must be >= 1, got {patience}")
        self.patience = int(patience)
        self.state = {"best": -math.inf, "bad": 0, "cooldown": AUTOSTEP_COOLDOWN, "stage": 0}

    def update(self, metric: float) -> bool:
        """True when the lr was just decayed."""
        st = self.state
        if metric > st["best"] + AUTOSTEP_THRESHOLD:
            st["best"], st["bad"] = metric, 0
        else:
            st["bad"] += 1
        if st["cooldown"] > 0:
            st["cooldown"] -= 1
            st["bad"] = 0
        if st["bad"] >= self.patience:
            st["stage"] += 1
            st["cooldown"], st["bad"] = AUTOSTEP_COOLDOWN, 0
            return True
        return False

    def state_dict(self) -> dict:
        return {k: float(v) for k, v in self.state.items()}  # plain floats: loads with weights_only=True

    def load_state_dict(self, saved: dict) -> None:
        self.state = {"best": float(saved["best"]), "bad": int(saved["bad"]), "cooldown": int(saved["cooldown"]),
                      "stage": int(saved["stage"])}


def reapply_lambdas(lr_scheduler_configs) -> None:
    """Set every group's lr from its scheduler's lambda now (an auto-step decay applies before the next step)."""
    for conf in lr_scheduler_configs:
        sch = conf.scheduler
        for group, base, fn in zip(sch.optimizer.param_groups, sch.base_lrs, sch.lr_lambdas):
            group["lr"] = base * fn(sch.last_epoch)
