"""A sharded DeepSpeed ZeRO (``zero``) or FSDP2 (``dcp``) checkpoint directory → one fp32 file that every glip_pl
reader and Lightning's ``load_from_checkpoint`` load. It keeps only what a weights file needs (``model.``-prefixed
``state_dict``, ``hyper_parameters``, ``glip_pl_config``, step, epoch), no loop or callback state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from .dcp import read_dcp_checkpoint
from .glip import CheckpointError, load_glip_checkpoint
from .zero import read_zero_checkpoint

KEEP = ("hyper_parameters", "glip_pl_config", "global_step", "epoch", "pytorch-lightning_version")


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
            raise CheckpointError(f"{zero_dir}: checkpoint of preset {hp['preset']!r}, but --preset "
                                  f"{preset!r} was given")
        hp["preset"] = preset
    if model_options is not None:
        if hp.get("model_options") not in (None, {}, model_options):
            raise CheckpointError(f"{zero_dir}: checkpoint model_options {hp['model_options']} differ from "
                                  f"{model_options}")
        hp["model_options"] = model_options
    if not hp.get("preset"):
        raise CheckpointError(f"{zero_dir}: the checkpoint does not say its preset (no hyper_parameters); "
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
        load_glip_checkpoint(out)
    return result


def consolidate_dcp_checkpoint(dcp_dir, out, verify: bool = True) -> dict:
    """Write ``out`` from the FSDP2 checkpoint directory ``dcp_dir`` (any number of ranks); returns the written
    dict. Only the weights are read (not the optimizer state). ``verify``: rebuild the model and load the weights
    strictly."""
    sd, meta = read_dcp_checkpoint(dcp_dir)
    sd = {k: v.detach().to(torch.float32) if v.is_floating_point() else v.detach() for k, v in sd.items()}
    hp = dict(meta.get("hyper_parameters") or {})
    if not hp.get("preset"):
        raise ValueError(f"{Path(dcp_dir) / 'meta.pt'}: the checkpoint does not say its preset (no "
                         "hyper_parameters.preset)")
    result = {k: meta[k] for k in KEEP if k in meta and k != "hyper_parameters"}
    result.update(state_dict=sd, hyper_parameters=hp, consolidated_from=str(dcp_dir))
    return _write(result, out, verify)


__all__ = ["consolidate_zero_checkpoint", "consolidate_dcp_checkpoint"]
