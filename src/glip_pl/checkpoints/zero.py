"""Reading a DeepSpeed ZeRO checkpoint directory (sharded fp32 optimizer partitions, as ``DeepSpeedStrategy`` saves
``<run>/checkpoints/last.ckpt/``) into one fp32 state dict, without running code from it.

Every file of the directory is read with ``torch.load(weights_only=True)`` (issue 21): DeepSpeed's own converter
(``zero_to_fp32``, which Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` wraps) unpickles with
``weights_only=False``, so a checkpoint folder from elsewhere could run code. The few DeepSpeed classes a ZeRO
checkpoint pickles are read as inert stand-ins (``DEEPSPEED_GLOBALS``); anything else is refused with the message
every glip_pl checkpoint reader gives, naming the file. The fp32 master weights are then rebuilt from the optimizer
partitions as ``deepspeed.utils.zero_to_fp32`` does it (ZeRO-1/2: each param group's partitions concatenated over
ranks; ZeRO-3: every parameter split over ranks), with the same consistency checks.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

from .glip import CheckpointError, safe_torch_load


class _Opaque:
    """Stand-in for a DeepSpeed object in an optimizer file (loss scaler, fragment address): its state is kept as
    data and never used; no DeepSpeed code runs to build it."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __setstate__(self, state):
        self.state = state


# Every non-tensor class DeepSpeed 0.19.8 pickles into a ZeRO-2 / ZeRO-3 checkpoint, fp32 and bf16 (measured with
# torch.serialization.get_unsafe_globals_in_checkpoint on real checkpoints; the model-states files hold none).
DEEPSPEED_GLOBALS = [
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),  # an IntEnum, pickled as ZeroStageEnum(2)
    (_Opaque, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Opaque, "deepspeed.utils.tensor_fragment.fragment_address"),  # ZeRO-1/2 'param_slice_mappings'
    # fp16 runs (GPU only, not measured here) keep a dynamic loss scaler instead (DeepSpeed's CreateLossScaler)
    (_Opaque, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
]

_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_mp_rank_(\d+)_(optim|model)_states\.pt$")


def read_zero_file(path) -> dict:
    """One file of a ZeRO checkpoint, loaded with ``weights_only=True`` and DeepSpeed's classes as stand-ins."""
    with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
        obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def _rank_files(tag_dir: Path, kind: str) -> list:
    """``*zero_pp_rank_<r>_mp_rank_00_<kind>_states.pt`` in rank order; all ranks 0..n-1 present."""
    found = {}
    for p in tag_dir.iterdir():
        m = _RANK_FILE.search(p.name)
        if m and m.group(3) == kind:
            if int(m.group(2)) != 0:
                raise CheckpointError(f"{p}: a model-parallel shard (mp_rank > 0); only data-parallel ZeRO "
                                      "checkpoints can be consolidated")
            found[int(m.group(1))] = p
    if sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{tag_dir}: {kind}-state files of ranks {sorted(found)}: some ranks are "
                              "missing (a checkpoint cut short?)")
    return [found[r] for r in range(len(found))]


def _get(d: dict, key: str, path):
    if key not in d:
        raise CheckpointError(f"{path}: not a DeepSpeed ZeRO checkpoint file (no {key!r}; keys: "
                              f"{sorted(map(str, d))[:10]})")
    return d[key]


def _zero12_params(param_shapes: list, partitions: list, paddings: Optional[list], where: Path) -> dict:
    """ZeRO-1/2: rank r holds the r-th slice of each param group's flat fp32 vector; params lie in it in order
    (each followed by its alignment padding when the checkpoint records one)."""
    world = len(partitions)
    out = {}
    for g, shapes in enumerate(param_shapes):
        flat = torch.cat([p[g] for p in partitions])
        pads = paddings[g] if paddings is not None else [0] * len(shapes)
        if len(pads) != len(shapes):
            raise CheckpointError(f"{where}: param group {g} has {len(shapes)} parameters but "
                                  f"{len(pads)} alignment paddings")
        offset = 0
        for (name, shape), pad in zip(shapes.items(), pads):
            n = math.prod(shape)
            out[name] = flat.narrow(0, offset, n).view(shape)
            offset += n + pad
        # each rank's slice is padded to a multiple of 2 x world (DeepSpeed's zero_to_fp32 checks the same way)
        align = 2 * world
        if align * math.ceil(offset / align) != align * math.ceil(flat.numel() / align):
            raise CheckpointError(f"{where}: param group {g} holds {flat.numel()} values but its "
                                  f"parameters need {offset}: the files do not belong together")
    return out


def _zero3_params(param_shapes: list, partitions: list, where: Path) -> dict:
    """ZeRO-3: every parameter is split into ``world`` equal (padded) slices, one per rank, in order."""
    world = len(partitions)
    flats = [torch.cat(list(p)) for p in partitions]
    out, offset = {}, 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            n = math.prod(shape)
            part = math.ceil(n / world)
            out[name] = torch.cat([f.narrow(0, offset, part) for f in flats]).narrow(0, 0, n).view(shape)
            offset += part
    if any(f.numel() != offset for f in flats):
        raise CheckpointError(f"{where}: the ranks hold {[f.numel() for f in flats]} values but the "
                              f"parameters need {offset} on each: the files do not belong together")
    return out


def read_zero_checkpoint(zero_dir, tag: Optional[str] = None) -> tuple:
    """(fp32 state dict with the module's names, rank 0's model-states dict) of a ZeRO checkpoint directory."""
    zero_dir = Path(zero_dir)
    if not zero_dir.is_dir():
        raise CheckpointError(
            f"{zero_dir}: not a directory (a DeepSpeed checkpoint is a directory with a 'latest' file and a tag "
            "sub-directory of *_model_states.pt / *_optim_states.pt)")
    if tag is None:
        if (zero_dir / "latest").is_file():
            tag = (zero_dir / "latest").read_text().strip()
        else:
            tags = [p.name for p in zero_dir.iterdir() if p.is_dir() and list(p.glob("*model_states.pt"))]
            if len(tags) != 1:
                raise CheckpointError(f"{zero_dir}: no 'latest' file; pass --tag (one of {sorted(tags)})")
            tag = tags[0]
    tag_dir = zero_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: no such tag directory in the DeepSpeed checkpoint")

    optim_files = _rank_files(tag_dir, "optim")
    if not optim_files:
        raise CheckpointError(f"{tag_dir}: no *_optim_states.pt files (saved without optimizer state?)")
    partitions, stage, paddings = [], None, None
    for f in optim_files:
        osd = _get(read_zero_file(f), "optimizer_state_dict", f)
        try:
            stage = int(_get(osd, "zero_stage", f)) if stage is None else stage
            world = _get(osd, "partition_count", f)
            world = max(world) if isinstance(world, (list, tuple)) else int(world)  # per group (expert groups)
            key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
            partitions.append([t.detach().reshape(-1) for t in _get(osd, key, f)])
        except (TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{f}: not a DeepSpeed ZeRO optimizer file ({type(e).__name__}: {e})") \
                from None
        if f == optim_files[0]:
            paddings = osd.get("param_alignment_paddings")
        del osd  # the Adam moments are not needed: drop them before reading the next rank
    if stage not in (1, 2, 3):
        raise CheckpointError(f"{optim_files[0]}: unknown ZeRO stage {stage!r}")
    if world != len(optim_files):
        raise CheckpointError(f"{tag_dir}: a checkpoint of {world} ranks but {len(optim_files)} "
                              "*_optim_states.pt files (an overwritten or partly saved checkpoint?)")

    if stage == 3:
        model_files = _rank_files(tag_dir, "model")
    else:
        model_files = [tag_dir / "mp_rank_00_model_states.pt"]
    if not model_files or not model_files[0].is_file():
        name = "zero_pp_rank_0_mp_rank_00" if stage == 3 else "mp_rank_00"
        raise CheckpointError(f"{tag_dir}: no model-states file ({name}_model_states.pt)")
    states = [read_zero_file(f) for f in model_files]
    ms = states[0]
    for key in ("module", "buffer_names", "param_shapes"):
        _get(ms, key, model_files[0])

    try:
        sd = OrderedDict((k, v) for k, v in ms["module"].items() if k in set(ms["buffer_names"]))  # buffers
        frozen = ms.get("frozen_param_shapes") or {}
        for name, shape in frozen.items():  # not in the optimizer: kept in the model-states file(s)
            frags = [s["frozen_param_fragments"][name] for s in states]
            sd[name] = frags[0] if stage < 3 else torch.cat(frags).narrow(0, 0, math.prod(shape)).view(shape)
        if stage == 3:
            sd.update(_zero3_params(ms["param_shapes"], partitions, tag_dir))
        else:
            sd.update(_zero12_params(ms["param_shapes"], partitions, paddings, tag_dir))
        for name, source in (ms.get("shared_params") or {}).items():  # tied weights are saved once
            if source in sd:
                sd[name] = sd[source]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{tag_dir}: the ZeRO files do not describe a consistent model "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return sd, ms


__all__ = ["DEEPSPEED_GLOBALS", "read_zero_file", "read_zero_checkpoint"]
