"""``glip-pl consolidate ZERO_CKPT_DIR OUT.ckpt``: a DeepSpeed ZeRO checkpoint (a directory of sharded fp32 optimizer
partitions, as ``DeepSpeedStrategy`` saves ``<run>/checkpoints/last.ckpt/``) → one fp32 file that ``glip_pl`` loads
for evaluation, prediction or as a teacher (``glip_pl.official.load_glip_checkpoint``, ``Predictor.from_checkpoint``,
``GLIPLitModule(init_weights=...)``) and Lightning's ``load_from_checkpoint`` too.

Every file of the directory is read with ``torch.load(weights_only=True)`` (issue 21): DeepSpeed's own converter
(``zero_to_fp32``, which Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` wraps) unpickles with
``weights_only=False``, so a checkpoint folder from elsewhere could run code. The few DeepSpeed classes a ZeRO
checkpoint pickles are read as inert stand-ins (``DEEPSPEED_GLOBALS``); anything else is refused with the message
every glip_pl checkpoint reader gives, naming the file. The fp32 master weights are then rebuilt from the optimizer
partitions as ``deepspeed.utils.zero_to_fp32`` does it (ZeRO-1/2: each param group's partitions concatenated over
ranks; ZeRO-3: every parameter split over ranks), with the same consistency checks.

The written file keeps only what a weights file needs: ``state_dict`` (``model.``-prefixed, as GLIPLitModule's),
``hyper_parameters`` (preset, model_options), ``glip_pl_config``, step and epoch — no loop or callback state.

An FSDP2 checkpoint (``GLIPFSDP2Strategy``: a ``torch.distributed.checkpoint`` directory of ``.metadata``, one
``__<rank>_0.distcp`` per rank and Lightning's ``meta.pt``) goes through ``consolidate_dcp_checkpoint`` into the same
kind of file; ``glip-pl consolidate`` picks the reader from the directory's contents.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

from glip_pl.model.types import GLIPInputError
from glip_pl.official import OfficialCheckpointError, _safe_torch_load

KEEP = ("hyper_parameters", "glip_pl_config", "global_step", "epoch", "pytorch-lightning_version")


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
        obj = _safe_torch_load(path)
    if not isinstance(obj, dict):
        raise OfficialCheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def _rank_files(tag_dir: Path, kind: str) -> list:
    """``*zero_pp_rank_<r>_mp_rank_00_<kind>_states.pt`` in rank order; all ranks 0..n-1 present."""
    found = {}
    for p in tag_dir.iterdir():
        m = _RANK_FILE.search(p.name)
        if m and m.group(3) == kind:
            if int(m.group(2)) != 0:
                raise OfficialCheckpointError(f"{p}: a model-parallel shard (mp_rank > 0); only data-parallel ZeRO "
                                              "checkpoints can be consolidated")
            found[int(m.group(1))] = p
    if sorted(found) != list(range(len(found))):
        raise OfficialCheckpointError(f"{tag_dir}: {kind}-state files of ranks {sorted(found)}: some ranks are "
                                      "missing (a checkpoint cut short?)")
    return [found[r] for r in range(len(found))]


def _get(d: dict, key: str, path):
    if key not in d:
        raise OfficialCheckpointError(f"{path}: not a DeepSpeed ZeRO checkpoint file (no {key!r}; keys: "
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
            raise OfficialCheckpointError(f"{where}: param group {g} has {len(shapes)} parameters but "
                                          f"{len(pads)} alignment paddings")
        offset = 0
        for (name, shape), pad in zip(shapes.items(), pads):
            n = math.prod(shape)
            out[name] = flat.narrow(0, offset, n).view(shape)
            offset += n + pad
        # each rank's slice is padded to a multiple of 2 x world (DeepSpeed's zero_to_fp32 checks the same way)
        align = 2 * world
        if align * math.ceil(offset / align) != align * math.ceil(flat.numel() / align):
            raise OfficialCheckpointError(f"{where}: param group {g} holds {flat.numel()} values but its "
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
        raise OfficialCheckpointError(f"{where}: the ranks hold {[f.numel() for f in flats]} values but the "
                                      f"parameters need {offset} on each: the files do not belong together")
    return out


def read_zero_checkpoint(zero_dir, tag: Optional[str] = None) -> tuple:
    """(fp32 state dict with the module's names, rank 0's model-states dict) of a ZeRO checkpoint directory."""
    zero_dir = Path(zero_dir)
    if not zero_dir.is_dir():
        raise OfficialCheckpointError(
            f"{zero_dir}: not a directory (a DeepSpeed checkpoint is a directory with a 'latest' file and a tag "
            "sub-directory of *_model_states.pt / *_optim_states.pt)")
    if tag is None:
        if (zero_dir / "latest").is_file():
            tag = (zero_dir / "latest").read_text().strip()
        else:
            tags = [p.name for p in zero_dir.iterdir() if p.is_dir() and list(p.glob("*model_states.pt"))]
            if len(tags) != 1:
                raise OfficialCheckpointError(f"{zero_dir}: no 'latest' file; pass --tag (one of {sorted(tags)})")
            tag = tags[0]
    tag_dir = zero_dir / tag
    if not tag_dir.is_dir():
        raise OfficialCheckpointError(f"{tag_dir}: no such tag directory in the DeepSpeed checkpoint")

    optim_files = _rank_files(tag_dir, "optim")
    if not optim_files:
        raise OfficialCheckpointError(f"{tag_dir}: no *_optim_states.pt files (saved without optimizer state?)")
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
            raise OfficialCheckpointError(f"{f}: not a DeepSpeed ZeRO optimizer file ({type(e).__name__}: {e})") \
                from None
        if f == optim_files[0]:
            paddings = osd.get("param_alignment_paddings")
        del osd  # the Adam moments are not needed: drop them before reading the next rank
    if stage not in (1, 2, 3):
        raise OfficialCheckpointError(f"{optim_files[0]}: unknown ZeRO stage {stage!r}")
    if world != len(optim_files):
        raise OfficialCheckpointError(f"{tag_dir}: a checkpoint of {world} ranks but {len(optim_files)} "
                                      "*_optim_states.pt files (an overwritten or partly saved checkpoint?)")

    if stage == 3:
        model_files = _rank_files(tag_dir, "model")
    else:
        model_files = [tag_dir / "mp_rank_00_model_states.pt"]
    if not model_files or not model_files[0].is_file():
        name = "zero_pp_rank_0_mp_rank_00" if stage == 3 else "mp_rank_00"
        raise OfficialCheckpointError(f"{tag_dir}: no model-states file ({name}_model_states.pt)")
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
        if isinstance(e, OfficialCheckpointError):
            raise
        raise OfficialCheckpointError(f"{tag_dir}: the ZeRO files do not describe a consistent model "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return sd, ms


def consolidate_zero_checkpoint(zero_dir, out, tag: Optional[str] = None, preset: Optional[str] = None,
                                model_options: Optional[dict] = None, verify: bool = True) -> dict:
    """Write ``out`` from the ZeRO checkpoint directory ``zero_dir``; returns the written dict.

    ``tag``: the sub-directory to read (default: the one named in ``zero_dir/latest``; Lightning's is "checkpoint").
    ``preset`` / ``model_options``: the model's description when the checkpoint's client state lacks
    ``hyper_parameters`` (a raw DeepSpeed checkpoint); they must agree with it when both are present.
    ``verify``: rebuild the model and load the weights strictly (raises on a mismatch).
    """
    params, full = read_zero_checkpoint(zero_dir, tag)
    # Lightning (< 2.1) and a raw wrapper name the LightningModule '_forward_module'
    sd = {(k[len("_forward_module."):] if k.startswith("_forward_module.") else k):
          v.detach().to(torch.float32) if v.is_floating_point() else v.detach() for k, v in params.items()}
    if sd and not any(k.startswith("model.") for k in sd):  # a bare GLIP module was wrapped, not the LightningModule
        sd = {f"model.{k}": v for k, v in sd.items()}
    hp = dict(full.get("hyper_parameters") or {})
    if preset is not None:
        if hp.get("preset") not in (None, preset):
            raise OfficialCheckpointError(f"{zero_dir}: checkpoint of preset {hp['preset']!r}, but --preset "
                                          f"{preset!r} was given")
        hp["preset"] = preset
    if model_options is not None:
        if hp.get("model_options") not in (None, {}, model_options):
            raise OfficialCheckpointError(f"{zero_dir}: checkpoint model_options {hp['model_options']} differ from "
                                          f"{model_options}")
        hp["model_options"] = model_options
    if not hp.get("preset"):
        raise OfficialCheckpointError(f"{zero_dir}: the checkpoint does not say its preset (no hyper_parameters); "
                                      "pass --preset")
    result = {k: full[k] for k in KEEP if k in full and k != "hyper_parameters"}
    result.update(state_dict={k: v.contiguous() for k, v in sd.items()}, hyper_parameters=hp,
                  consolidated_from=str(zero_dir))
    return _write(result, out, verify)


def _write(result: dict, out, verify: bool) -> dict:
    """Write the consolidated checkpoint atomically; ``verify``: rebuild the model and load the weights strictly."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    torch.save(result, tmp_out)
    os.replace(tmp_out, out)
    if verify:
        from glip_pl.official import load_glip_checkpoint

        load_glip_checkpoint(out)
    return result


# ------------------------------------------------------------------------- FSDP2 (torch.distributed.checkpoint)
def consolidate_dcp_checkpoint(dcp_dir, out, verify: bool = True) -> dict:
    """Write ``out`` from the FSDP2 checkpoint directory ``dcp_dir`` (any number of ranks); returns the written
    dict. Only the weights are read (not the optimizer state); ``meta.pt`` (Lightning's loop state, hyper-parameters)
    with ``torch.load(weights_only=True)``. ``verify``: rebuild the model and load the weights strictly."""
    import io

    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from glip_pl.lit.dcp import is_dcp_checkpoint, read_dcp_metadata, safe_dcp_reader

    class _Planner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:  # the default unpickles anything
            raise ValueError(f"{dcp_dir}: non-tensor entry {read_item.dest_index.fqn!r} among the weights")

    dcp_dir = Path(dcp_dir)
    if not is_dcp_checkpoint(dcp_dir):
        raise FileNotFoundError(f"{dcp_dir}: not a torch.distributed.checkpoint directory (no .metadata file)")
    meta_path = dcp_dir / "meta.pt"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (Lightning writes it beside the shards: step, hyper-parameters)")
    read_dcp_metadata(dcp_dir)  # a refused .metadata: one clear error here, not torch's wrapped and logged one
    meta = torch.load(meta_path, map_location="cpu", weights_only=True)
    loaded: dict = {}
    _load_state_dict(loaded, storage_reader=safe_dcp_reader(dcp_dir), planner=_Planner(keys={"state_dict"}),
                     no_dist=True)
    sd = loaded.get("state_dict")
    if not sd:
        raise ValueError(f"{dcp_dir}: no 'state_dict' entry in the checkpoint (keys {sorted(loaded)[:5]})")
    sd = {k: v.detach().to(torch.float32) if v.is_floating_point() else v.detach() for k, v in sd.items()}
    hp = dict(meta.get("hyper_parameters") or {})
    if not hp.get("preset"):
        raise ValueError(f"{meta_path}: the checkpoint does not say its preset (no hyper_parameters.preset)")
    result = {k: meta[k] for k in KEEP if k in meta and k != "hyper_parameters"}
    result.update(state_dict=sd, hyper_parameters=hp, consolidated_from=str(dcp_dir))
    return _write(result, out, verify)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "consolidate",
        help="DeepSpeed ZeRO or FSDP2 (torch.distributed.checkpoint) directory -> one fp32 glip_pl checkpoint file",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("zero_dir", help="the ZeRO or FSDP2 checkpoint directory (e.g. runs/x/checkpoints/last.ckpt/)")
    p.add_argument("out", help="output file (e.g. runs/x/consolidated.ckpt)")
    p.add_argument("--tag", help="tag sub-directory (default: from the 'latest' file)")
    p.add_argument("--preset", help="model preset, when the checkpoint does not record it")
    p.add_argument("--model-options", type=json.loads, help="JSON build_glip overrides, when not recorded")
    p.add_argument("--no-verify", action="store_true", help="skip rebuilding the model to check the weights")
    p.set_defaults(func=_main)


def _main(args) -> int:
    import pickle

    from glip_pl.lit.dcp import is_dcp_checkpoint

    try:
        if is_dcp_checkpoint(args.zero_dir):
            res = consolidate_dcp_checkpoint(args.zero_dir, args.out, verify=not args.no_verify)
        else:
            res = consolidate_zero_checkpoint(args.zero_dir, args.out, tag=args.tag, preset=args.preset,
                                              model_options=args.model_options, verify=not args.no_verify)
    except (ValueError, OSError, pickle.UnpicklingError) as e:  # GLIPInputError is a ValueError
        print(f"glip-pl consolidate: error: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in res["state_dict"].values())
    print(f"[glip_pl] wrote {args.out}: {len(res['state_dict'])} tensors, {n:,} values (fp32), preset "
          f"{res['hyper_parameters']['preset']!r}, step {res.get('global_step')}")
    return 0
