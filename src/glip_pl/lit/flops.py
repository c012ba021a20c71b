"""FLOPs of one training step (forward + loss + backward) at a real batch's shapes, counted on a fake copy of the live
model (``FakeTensorMode``): no device memory, no collective, the RNG untouched, so counting cannot change the run.
Model FLOPs in ``benchmarks/count_flops.py``'s conventions: plain attention and the grid_sample deformable conv (the
fused kernels are invisible to the counter), no activation-checkpointing recomputation."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Optional

import torch
from torch import nn


class FlopsNotCounted(RuntimeError):
    """The step cannot be counted on a fake copy (the message says why)."""


def _sharded(model: nn.Module) -> Optional[str]:
    for name, p in model.named_parameters():
        if hasattr(p, "full_tensor"):
            return f"parameter {name} is a DTensor shard (FSDP2)"
        if hasattr(p, "ds_numel") and p.numel() != p.ds_numel:
            return f"parameter {name} is a DeepSpeed ZeRO-3 partition"
    return None


def _fake(mode, obj):
    if isinstance(obj, torch.Tensor):
        with mode:
            out = torch.empty(obj.shape, dtype=obj.dtype, device="cpu")
        return out
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _fake(mode, getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fake(mode, x) for x in obj)
    if isinstance(obj, dict):
        return {k: _fake(mode, v) for k, v in obj.items()}
    return obj


def _identity(x):
    return x


def fake_copy(model: nn.Module, mode) -> nn.Module:
    """Methods bound outside the model (the Lightning module's all-reduce hook on the criterion) become the
    identity: the copy runs in one process."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        f = _fake(mode, t.detach())
        memo[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
    inside = {id(m) for m in model.modules()}
    for m in model.modules():
        for v in vars(m).values():
            if inspect.ismethod(v) and id(v.__self__) not in inside:
                memo[id(v)] = _identity
    from glip_pl.model.dyhead import ModulatedDeformConv3x3

    twin = copy.deepcopy(model, memo)
    for m in twin.modules():
        if isinstance(m, ModulatedDeformConv3x3):
            m.impl = "grid_sample"
        if isinstance(getattr(m, "use_sdpa", None), bool):
            m.use_sdpa = False
        for flag in ("checkpoint_fusion", "checkpoint_text", "checkpoint_dyhead"):
            if isinstance(getattr(m, flag, None), bool):
                setattr(m, flag, False)
        if getattr(m, "grad_checkpointing", False) is True:  # timm
            m.grad_checkpointing = False
        if getattr(m, "gradient_checkpointing", False) is True:  # transformers
            m.gradient_checkpointing = False
        m._compiled_call_impl = None
    return twin


def train_step_flops(model: nn.Module, images, image_sizes, text, targets) -> int:
    """``model`` is the plain GLIP; ``FlopsNotCounted`` when its parameters are sharded (FSDP2, ZeRO-3: no full
    shapes to copy) or the fake run fails."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    why = _sharded(model)
    if why:
        raise FlopsNotCounted(why)
    mode = FakeTensorMode()
    try:
        twin = fake_copy(model, mode).train()
        images, image_sizes, text, targets = _fake(mode, (images, image_sizes, text, targets))
        params = [p for p in twin.parameters() if p.requires_grad]
        with mode, FlopCounterMode(display=False) as counter:
            terms = twin.loss(twin(images, image_sizes, text), targets)
            total = twin.criterion.total(terms)
            torch.autograd.grad(total, params, allow_unused=True)
    except Exception as e:  # noqa: BLE001 - any op without a fake kernel: report, never stop training
        raise FlopsNotCounted(f"{type(e).__name__}: {e}") from e
    return int(counter.get_total_flops())
