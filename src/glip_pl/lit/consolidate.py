"""``glip-pl consolidate ZERO_CKPT_DIR OUT.ckpt``: a DeepSpeed ZeRO checkpoint (a directory of sharded fp32 optimizer
partitions, as ``DeepSpeedStrategy`` saves ``<run>/checkpoints/last.ckpt/``) → one fp32 file that ``glip_pl`` loads
for evaluation, prediction or as a teacher (``glip_pl.official.load_glip_checkpoint``, ``Predictor.from_checkpoint``,
``GLIPLitModule(init_weights=...)``) and Lightning's ``load_from_checkpoint`` too.

Wraps ``lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict`` (which merges the fp32
partitions and keeps Lightning's client state from rank 0), then keeps only what a weights file needs: ``state_dict``
(``model.``-prefixed, as GLIPLitModule's), ``hyper_parameters`` (preset, model_options), ``glip_pl_config``, step and
epoch — no loop or callback state, so the file loads with ``torch.load(weights_only=True)``.

An FSDP2 checkpoint (``GLIPFSDP2Strategy``: a ``torch.distributed.checkpoint`` directory of ``.metadata``, one
``__<rank>_0.distcp`` per rank and Lightning's ``meta.pt``) goes through ``consolidate_dcp_checkpoint`` into the same
kind of file; ``glip-pl consolidate`` picks the reader from the directory's contents.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

KEEP = ("hyper_parameters", "glip_pl_config", "global_step", "epoch", "pytorch-lightning_version")


def consolidate_zero_checkpoint(zero_dir, out, tag: Optional[str] = None, preset: Optional[str] = None,
                                model_options: Optional[dict] = None, verify: bool = True) -> dict:
    """Write ``out`` from the ZeRO checkpoint directory ``zero_dir``; returns the written dict.

    ``tag``: the sub-directory to read (default: the one named in ``zero_dir/latest``; Lightning's is "checkpoint").
    ``preset`` / ``model_options``: the model's description when the checkpoint's client state lacks
    ``hyper_parameters`` (a raw DeepSpeed checkpoint); they must agree with it when both are present.
    ``verify``: rebuild the model and load the weights strictly (raises on a mismatch).
    """
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    zero_dir = Path(zero_dir)
    if not zero_dir.is_dir():
        raise FileNotFoundError(f"{zero_dir}: not a directory (a DeepSpeed checkpoint is a directory with a 'latest' "
                                "file and a tag sub-directory of *_model_states.pt / *_optim_states.pt)")
    if tag is None and not (zero_dir / "latest").is_file():
        tags = [p.name for p in zero_dir.iterdir() if p.is_dir() and list(p.glob("*model_states.pt"))]
        if len(tags) != 1:
            raise ValueError(f"{zero_dir}: no 'latest' file; pass --tag (one of {sorted(tags)})")
        tag = tags[0]
    if tag is not None and not (zero_dir / "latest").is_file():
        # Lightning's converter finds the tag directory through 'latest' even when a tag is given
        (zero_dir / "latest").write_text(tag)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        full = convert_zero_checkpoint_to_fp32_state_dict(zero_dir, os.path.join(tmp, "full.pt"), tag=tag)
    sd = {k: v.detach().to(torch.float32) if v.is_floating_point() else v.detach()
          for k, v in full["state_dict"].items()}
    if sd and not any(k.startswith("model.") for k in sd):  # a bare GLIP module was wrapped, not the LightningModule
        sd = {f"model.{k}": v for k, v in sd.items()}
    hp = dict(full.get("hyper_parameters") or {})
    if preset is not None:
        if hp.get("preset") not in (None, preset):
            raise ValueError(f"{zero_dir}: checkpoint of preset {hp['preset']!r}, but --preset {preset!r} was given")
        hp["preset"] = preset
    if model_options is not None:
        if hp.get("model_options") not in (None, {}, model_options):
            raise ValueError(f"{zero_dir}: checkpoint model_options {hp['model_options']} differ from {model_options}")
        hp["model_options"] = model_options
    if not hp.get("preset"):
        raise ValueError(f"{zero_dir}: the checkpoint does not say its preset (no hyper_parameters); pass --preset")
    result = {k: full[k] for k in KEEP if k in full and k != "hyper_parameters"}
    result.update(state_dict=sd, hyper_parameters=hp, consolidated_from=str(zero_dir))
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    torch.save(result, tmp_out)
    os.replace(tmp_out, out)
    if verify:
        from glip_pl.official import load_glip_checkpoint

        load_glip_checkpoint(out)
    return result


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
    from glip_pl.lit.dcp import is_dcp_checkpoint

    if is_dcp_checkpoint(args.zero_dir):
        res = consolidate_dcp_checkpoint(args.zero_dir, args.out, verify=not args.no_verify)
    else:
        res = consolidate_zero_checkpoint(args.zero_dir, args.out, tag=args.tag, preset=args.preset,
                                          model_options=args.model_options, verify=not args.no_verify)
    n = sum(v.numel() for v in res["state_dict"].values())
    print(f"[glip_pl] wrote {args.out}: {len(res['state_dict'])} tensors, {n:,} values (fp32), preset "
          f"{res['hyper_parameters']['preset']!r}, step {res.get('global_step')}")
    return 0
