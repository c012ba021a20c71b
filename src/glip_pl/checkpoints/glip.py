"""glip_pl's own checkpoint files: model files (``import-official`` output, ``glip-pl consolidate`` output) and
Lightning checkpoints of ``GLIPLitModule``: safe reading, the one strict-load check, writing, and building a model.

Every file is read with ``torch.load(weights_only=True)`` only: a file that needs more than tensors and plain
containers is refused (``CheckpointError``), never unpickled.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import asdict, replace
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Union

import torch
from torch import Tensor

from ..model.presets import PRESETS, GLIPConfig, get_config
from ..model.types import GLIPInputError

FORMAT = "glip_pl"
FORMAT_VERSION = 1

PresetLike = Union[str, GLIPConfig]


class CheckpointError(GLIPInputError):
    """A checkpoint that cannot be read or converted: unsafe, incomplete, or for another model."""


def safe_torch_load(path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; every failure is one ``CheckpointError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: refused — this file needs more than plain tensors and containers to load (it pickles "
            f"Python objects), and glip_pl refuses to unpickle arbitrary objects because unpickling can run "
            f"code (torch.load(weights_only=True) said: {first}). If you trust the file, re-save just its "
            "weights in a trusted environment, e.g. torch.save({'model': ckpt['model']}, 'clean.pth'), and "
            "import that."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({first})") from None


def checkpoint_problem(path: str) -> Optional[str]:
    """None when ``path`` is a loadable Lightning checkpoint, else why not, in one line."""
    if os.path.isdir(path):  # sharded (DeepSpeed/FSDP) checkpoints: a directory, complete once renamed
        return None if os.listdir(path) else "empty checkpoint directory"
    if not os.path.exists(path):
        return "no such file"
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with zipfile.ZipFile(path) as z:  # torch.save's format; the central directory is written last
            z.namelist()
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except zipfile.BadZipFile:
        return f"truncated or not a torch.save file ({os.path.getsize(path)} bytes, no complete zip directory)"
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; its "unsupported GLOBAL x" line says what the file wanted to run
        what = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
        return ("needs unpickling of arbitrary Python objects, refused: checkpoints are read with "
                f"torch.load(weights_only=True){' (' + what + ')' if what else ''}")
    except Exception as e:  # RuntimeError (truncated records), OSError
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return f"{type(e).__name__}: {first}"
    if not isinstance(ck, dict) or "state_dict" not in ck or "global_step" not in ck:
        return "not a Lightning training checkpoint (no state_dict/global_step)"
    return None


def check_tensors(sd: dict, where: str) -> dict:
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        more = " ..." if len(bad) > 5 else ""
        raise CheckpointError(f"{where}: entries that are not tensors: {bad[:5]}{more}")
    return sd


def check_state_dict(sd: dict, expected: dict, where: str, optional=()) -> None:
    """Raise ``CheckpointError`` (``where``: then every missing, unexpected and wrongly shaped name, five of each)
    unless ``sd`` has exactly the names and shapes of ``expected`` ({name: shape}); ``optional`` names may be
    missing."""
    missing = [k for k in expected if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k])}" for k in expected
                  if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{where}: {len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(mismatched)} shape mismatches {mismatched[:5]}"
        )


# --------------------------------------------------------------------------------------------- presets


def preset_config(preset: PresetLike) -> GLIPConfig:
    if isinstance(preset, GLIPConfig):
        return preset
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return get_config(preset, official_compat=True)


def _without_pretrained(cfg: GLIPConfig) -> GLIPConfig:
    return replace(cfg, swin=replace(cfg.swin, pretrained=None), text=replace(cfg.text, pretrained=None))


def _shape_key(cfg: GLIPConfig) -> str:
    """Cache key of ``glip_shapes``: the whole config but the weight paths (which never change names/shapes)."""
    d = asdict(cfg)
    for sub in ("swin", "text"):
        d[sub].pop("pretrained", None)
    return repr(sorted(d.items()))


_SHAPES_CACHE: dict = {}


def glip_shapes(preset: PresetLike) -> dict:
    """{glip_pl state-dict name: shape} of a preset, from a model built on the meta device (no memory)."""
    from ..model.glip import GLIP

    cfg = _without_pretrained(preset_config(preset))
    key = _shape_key(cfg)
    if key not in _SHAPES_CACHE:
        with torch.device("meta"):
            model = GLIP(cfg)
        _SHAPES_CACHE[key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return dict(_SHAPES_CACHE[key])


def _config_from_dict(preset: str, config: dict) -> GLIPConfig:
    """The preset's defaults overridden by every stored field (nested dicts allowed)."""
    config = dict(config)
    for sub in ("swin", "text"):
        if isinstance(config.get(sub), dict):
            config[sub] = {**config[sub], "pretrained": None}  # the weights come from the checkpoint
    try:
        return get_config(preset, **config)
    except GLIPInputError as e:
        raise CheckpointError(f"the checkpoint's model config does not fit this glip_pl version: {e}") from None


# --------------------------------------------------------------------------------------------- files


def write_glip_checkpoint(out, preset: str, cfg: GLIPConfig, state_dict: dict, **extra) -> None:
    """A glip_pl model file: the format tag, the preset, the whole config and the weights (+ ``extra`` keys)."""
    ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "preset": preset, "config": asdict(cfg),
            "state_dict": state_dict, **extra}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)


def read_glip_checkpoint(path, preset: Optional[str] = None) -> tuple:
    """(GLIPConfig, preset, state dict) of a glip_pl model file or a Lightning checkpoint of the GLIP module."""
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        ck_preset, config, sd = obj.get("preset"), obj.get("config") or {}, obj.get("state_dict")
    elif isinstance(obj.get("state_dict"), dict):  # a Lightning checkpoint of the GLIP module
        hp = obj.get("hyper_parameters") or {}
        ck_preset = hp.get("preset")
        # GLIPLitModule(preset, model_options): the options are build_glip overrides ("swin__depths", ...)
        config = {k: v for k, v in (hp.get("model_options") or {}).items() if "pretrained" not in k}
        sd = obj["state_dict"]
        if any(k.startswith("model.") for k in sd):
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    elif "model" in obj:
        raise CheckpointError(
            f"{path}: this looks like an official GLIP checkpoint; convert it first with "
            "`glip-pl import-official SRC OUT --preset P`"
        )
    else:
        keys = sorted(map(str, obj))[:10]
        raise CheckpointError(f"{path}: not a glip_pl checkpoint (top-level keys: {keys})")
    if preset is not None and ck_preset is not None and preset != ck_preset:
        raise CheckpointError(f"{path}: a checkpoint of preset {ck_preset!r}, but {preset!r} was asked for")
    ck_preset = ck_preset or preset
    if ck_preset is None:
        raise CheckpointError(f"{path}: the checkpoint does not say its preset; pass one (--preset)")
    if ck_preset not in PRESETS:
        raise CheckpointError(f"{path}: unknown preset {ck_preset!r}; known: {sorted(PRESETS)}")
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path}: no state_dict in the checkpoint")
    return _config_from_dict(ck_preset, config), ck_preset, check_tensors(sd, f"{path}['state_dict']")


def load_glip_checkpoint(path, preset: Optional[str] = None, map_location="cpu"):
    """The GLIP model a glip_pl checkpoint describes, weights loaded strictly, in eval mode.

    ``preset``: when given, the checkpoint must be of this preset.
    """
    from ..model.glip import GLIP

    cfg, ck_preset, sd = read_glip_checkpoint(path, preset)
    check_state_dict(sd, glip_shapes(cfg), f"{path}: the weights do not fit a {ck_preset!r} model (checkpoint of "
                     "another preset or version?)")
    model = GLIP(cfg)
    model.load_state_dict(sd, strict=True)
    return model.to(map_location).eval()


def load_model_weights(model, path, preset: Optional[str] = None) -> None:
    """Load a checkpoint's weights into ``model`` strictly, so that another preset or a shape mismatch fails before
    any training starts. ``model.optional_state_keys`` (e.g. a new zero-init prompt) may be absent."""
    _, ck_preset, sd = read_glip_checkpoint(path, preset)
    optional = set(getattr(model, "optional_state_keys", ()))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(sd, expected, f"{path}: weights of preset {ck_preset!r} do not fit this model", optional)
    model.load_state_dict(sd, strict=not any(k not in sd for k in optional))


def read_run_config(path) -> Optional[str]:
    """The run's config (YAML text) a Lightning checkpoint of the GLIP module saves as ``glip_pl_config`` (kept by
    ``glip-pl consolidate``); None when the file records none or does not load (its loader reports that)."""
    try:  # mmap: only the small dicts are read, not the weights
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    text = obj.get("glip_pl_config") if isinstance(obj, dict) else None
    return text if isinstance(text, str) else None


# --------------------------------------------------------------------------------------------- loaders

CheckpointLoader = Callable[[str], "torch.nn.Module"]
# The readers ``load_model`` tries when it is given none; a caller with its own passes ``loaders=``.
DEFAULT_LOADERS: Mapping[str, CheckpointLoader] = MappingProxyType({"glip_pl": load_glip_checkpoint})


def load_model(path, loader: Union[None, str, CheckpointLoader] = None,
               loaders: Optional[Mapping[str, CheckpointLoader]] = None):
    """A GLIP model from a checkpoint path through ``loader``: a callable ``fn(path) -> GLIP``, a name in
    ``loaders`` (default ``DEFAULT_LOADERS``), or None: each of ``loaders`` in order until one returns a model
    (a loader declines a file by raising)."""
    loaders = DEFAULT_LOADERS if loaders is None else loaders
    if callable(loader):
        return loader(os.fspath(path))
    if isinstance(loader, str):
        if loader not in loaders:
            raise GLIPInputError(f"unknown checkpoint loader {loader!r}; registered: {sorted(loaders)}")
        return loaders[loader](os.fspath(path))
    if not Path(path).is_file():
        raise GLIPInputError(f"checkpoint {os.fspath(path)!r}: no such file")
    errors = []
    for name, fn in loaders.items():
        try:
            return fn(os.fspath(path))
        except ImportError as e:
            errors.append(f"{name}: not available ({e})")
        except Exception as e:
            errors.append(f"{name}: {e}")
    raise GLIPInputError(f"checkpoint {os.fspath(path)!r}: no loader could read it:\n  " + "\n  ".join(errors))
