"""Distribution strategies for GLIP in one place: FSDP2 sharding per GLIP block, activation checkpointing and mixed
precision. Nothing in ``glip_pl.model`` knows which strategy runs it.

FSDP2 through Lightning's ``ModelParallelStrategy``, not FSDP1's ``FSDPStrategy``: that one refuses a CPU
accelerator, so it could never be tested here; FSDP2 runs on CPU with gloo and on GPUs with NCCL.
Activation checkpointing turns on the model's own switches rather than wrapping blocks with ``checkpoint_wrapper``,
which renames every parameter (``..._checkpoint_wrapped_module...``) in the optimizer's groups and in checkpoints.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import ModelParallelStrategy

CHECKPOINT_PARTS = ("backbone", "text", "fusion", "dyhead")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def glip_block_classes() -> set:
    """The module classes sharded as FSDP units (and checkpointed when asked)."""
    from timm.models.swin_transformer import SwinTransformerBlock
    from transformers.models.bert.modeling_bert import BertLayer

    from glip_pl.model.dyhead import DyHeadBlock
    from glip_pl.model.fusion import BiAttentionFusion
    from glip_pl.model.text_layer import TextLayer

    return {SwinTransformerBlock, BertLayer, TextLayer, BiAttentionFusion, DyHeadBlock}


def glip_blocks(model: torch.nn.Module) -> list:
    """The block instances of ``model``, outermost first (blocks do not nest, so every block is one unit)."""
    classes = tuple(glip_block_classes())
    return [m for m in model.modules() if isinstance(m, classes)]


def _dtype(name: Optional[str], what: str) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"{what}: unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def enable_activation_checkpointing(model: torch.nn.Module, parts=CHECKPOINT_PARTS) -> None:
    """Turn on the model's checkpointing switches for ``parts`` (as ``checkpoint_<part>=True`` at build time)."""
    unknown = set(parts) - set(CHECKPOINT_PARTS)
    if unknown:
        raise ValueError(f"activation_checkpointing: unknown part(s) {sorted(unknown)}; use {list(CHECKPOINT_PARTS)}")
    if "backbone" in parts:
        model.backbone.body.set_grad_checkpointing(True)
    if "text" in parts:
        model.language_backbone.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        model.head.checkpoint_text = True
    if "fusion" in parts:
        model.head.checkpoint_fusion = True
    if "dyhead" in parts:
        model.head.checkpoint_dyhead = True


def shard_glip(model: torch.nn.Module, mesh, *, reshard_after_forward: bool = True,
               param_dtype: Optional[torch.dtype] = None, reduce_dtype: Optional[torch.dtype] = None) -> None:
    """``fully_shard`` every GLIP block of ``model``, then ``model`` itself (the root), over ``mesh`` (1-D)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None or reduce_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in glip_blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def configure_sharding(lit_module) -> None:
    """Shard under a ``ModelParallelStrategy``, else nothing; idempotent, as Lightning asks of ``configure_model``."""
    from torch.distributed.fsdp import FSDPModule

    trainer = getattr(lit_module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, ModelParallelStrategy) or isinstance(lit_module.model, FSDPModule):
        return
    averaging = [type(c).__name__ for c in trainer.callbacks if isinstance(c, WeightAveraging)]
    if averaging:
        # Lightning's WeightAveraging keeps a deep copy of the module, which FSDP2 modules refuse
        raise ValueError(f"{', '.join(averaging)} (weight averaging / EMA) does not work with a sharded model: "
                         "remove it from trainer.callbacks to train with FSDP2, or train with DDP / DeepSpeed")
    opts = strategy.glip_options if isinstance(strategy, GLIPFSDP2Strategy) else {}
    precision = str(getattr(trainer, "precision", ""))
    if opts.get("param_dtype") not in (None, torch.float32) and not precision.endswith("-mixed"):
        # the image normalisation runs in fp32 (model/backbone.py): only autocast lets it meet bf16/fp16 weights
        raise ValueError(f"GLIPFSDP2Strategy param_dtype {opts['param_dtype']} needs trainer.precision bf16-mixed "
                         f"(autocast), got {precision!r}")
    mesh = strategy.device_mesh
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError("GLIP has no tensor-parallel plan: use tensor_parallel_size 1 (GLIPFSDP2Strategy does)")
    if opts.get("activation_checkpointing"):
        enable_activation_checkpointing(lit_module.model, opts["activation_checkpointing"])
    shard_glip(lit_module.model, mesh["data_parallel"], reshard_after_forward=opts.get("reshard_after_forward", True),
               param_dtype=opts.get("param_dtype"), reduce_dtype=opts.get("reduce_dtype"))


class GLIPFSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process (data parallel = world size, no tensor parallelism), one unit per GLIP block.

    Args:
        activation_checkpointing: ``true`` (all parts), ``false``, or a list of ``CHECKPOINT_PARTS``.
        param_dtype: compute dtype of the blocks (``bf16``; ``null``: fp32); needs ``trainer.precision: bf16-mixed``.
        reduce_dtype: dtype of the gradient reduction (e.g. ``fp32``; ``null``: the parameters' dtype).
        reshard_after_forward: free gathered parameters after forward (ZeRO-3-like) or keep them (ZeRO-2-like).
        save_distributed_checkpoint: one shard file per rank (``glip-pl consolidate`` makes one file of it).
        data_parallel_size: processes that shard the model (``auto``: all).
        **kwargs: Lightning's ``ModelParallelStrategy`` arguments.
    """

    def __init__(self, activation_checkpointing: Union[bool, list] = False, param_dtype: Optional[str] = None,
                 reduce_dtype: Optional[str] = None, reshard_after_forward: bool = True,
                 save_distributed_checkpoint: bool = True,
                 data_parallel_size: Union[Literal["auto"], int] = "auto", **kwargs):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        if activation_checkpointing is True:
            parts = CHECKPOINT_PARTS
        elif not activation_checkpointing:
            parts = ()
        else:
            parts = tuple(activation_checkpointing)
            unknown = set(parts) - set(CHECKPOINT_PARTS)
            if unknown:
                raise ValueError(f"activation_checkpointing: unknown part(s) {sorted(unknown)}; "
                                 f"use true, false or a list of {list(CHECKPOINT_PARTS)}")
        self.glip_options = {
            "activation_checkpointing": parts,
            "param_dtype": _dtype(param_dtype, "param_dtype"),
            "reduce_dtype": _dtype(reduce_dtype, "reduce_dtype"),
            "reshard_after_forward": bool(reshard_after_forward),
        }

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict:
        # torch.distributed.checkpoint unpickles .metadata and non-tensor entries without restriction: check them
        # first, so that resuming from a sharded directory is as safe as torch.load(weights_only=True)
        from glip_pl.checkpoints.dcp import check_dcp_checkpoint, is_dcp_checkpoint

        if is_dcp_checkpoint(checkpoint_path):
            check_dcp_checkpoint(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def setup_environment(self) -> None:
        # Lightning's "auto" is one data-parallel group per node (tensor parallel inside); GLIP shards over all
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
