"""Pretrained weights by name: the released GLIP checkpoints and timm's ImageNet Swin weights on the Hugging Face Hub.

Files are downloaded once into the Hugging Face cache when the network is allowed and read from it under
``HF_HUB_OFFLINE=1`` (compute nodes, tests); a name that cannot be resolved is an error that says what to run. The
cache location and offline switch are read from the environment at call time, not when ``huggingface_hub`` was
imported, so a job or test can point them elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .model.types import GLIPInputError

OFFICIAL_REPO = "GLIPModel/GLIP"


@dataclass(frozen=True)
class OfficialWeights:
    repo: str
    filename: str
    preset: str
    description: str


# The official model zoo (microsoft/GLIP README) as mirrored on the Hub; T(B), T(C) and GLIP-T share one architecture.
OFFICIAL_WEIGHTS = {
    "glip_t_a": OfficialWeights(OFFICIAL_REPO, "glip_a_tiny_o365.pth", "glip_t_a", "GLIP-T (A): O365, no deep fusion"),
    "glip_t_b": OfficialWeights(OFFICIAL_REPO, "glip_tiny_model_o365.pth", "glip_t", "GLIP-T (B): O365"),
    "glip_t_c": OfficialWeights(OFFICIAL_REPO, "glip_tiny_model_o365_goldg.pth", "glip_t", "GLIP-T (C): O365, GoldG"),
    "glip_t": OfficialWeights(OFFICIAL_REPO, "glip_tiny_model_o365_goldg_cc_sbu.pth", "glip_t",
                              "GLIP-T: O365, GoldG, CC3M, SBU"),
    "glip_l": OfficialWeights(OFFICIAL_REPO, "glip_large_model.pth", "glip_l",
                              "GLIP-L: FourODs, GoldG, CC3M+12M, SBU"),
}

# timm tags equal to the ImageNet files the official configs start from (reference §1.2 MODEL.WEIGHT).
SWIN_FOR_PRESET = {
    "glip_t_a": "timm/swin_tiny_patch4_window7_224.ms_in1k",  # swin_tiny_patch4_window7_224.pth
    "glip_t": "timm/swin_tiny_patch4_window7_224.ms_in1k",
    "glip_l": "timm/swin_large_patch4_window12_384.ms_in22k",  # swin_large_patch4_window12_384_22k.pth
}

# What timm's own hub loading looks for, in its order.
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_cache_dir() -> Optional[str]:
    """The hub cache the environment names now, in huggingface_hub's order; None = the library default."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.path.expandvars(os.environ[var]))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"])), "hub")
    return None


def hf_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE")
    if flag is not None:
        return flag.strip().lower() in ("1", "true", "yes", "on")
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_command(repo: str, *files: str) -> str:
    """``hf`` is huggingface_hub's CLI since 0.34."""
    return " ".join(["hf", "download", repo, *files])


def glip_pl_cache_dir() -> Path:
    if os.environ.get("GLIP_PL_CACHE"):
        return Path(os.environ["GLIP_PL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glip_pl"


class _NotInRepo(Exception):
    pass


def hub_file(repo: str, filename: str, what: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = hf_offline()
    try:
        return hf_hub_download(repo, filename, cache_dir=hf_cache_dir(), local_files_only=offline)
    except LocalEntryNotFoundError:
        cache = hf_cache_dir() or "the default Hugging Face cache"
        why = "HF_HUB_OFFLINE=1" if offline else "the Hub cannot be reached"
        raise GLIPInputError(
            f"{what}: {repo}/{filename} is not in the Hugging Face cache ({cache}) and {why}; "
            f"run once with network: `{download_command(repo, filename)}`"
        ) from None
    except EntryNotFoundError:
        raise _NotInRepo(filename) from None
    except RepositoryNotFoundError:
        raise GLIPInputError(f"{what}: the Hugging Face Hub has no repository {repo!r} (or it is private)") from None
    except HfHubHTTPError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GLIPInputError(f"{what}: downloading {repo}/{filename} failed ({first})") from None


def official_weights(name: str) -> OfficialWeights:
    """The entry of a short name (``glip_t``) or a released file name (``glip_tiny_model_o365_goldg.pth``)."""
    if name in OFFICIAL_WEIGHTS:
        return OFFICIAL_WEIGHTS[name]
    for w in OFFICIAL_WEIGHTS.values():
        if name in (w.filename, f"{w.repo}/{w.filename}"):
            return w
    known = ", ".join(f"{k} ({w.description})" for k, w in OFFICIAL_WEIGHTS.items())
    raise GLIPInputError(f"unknown pretrained GLIP name {name!r}; known names: {known}")


def is_official_name(name) -> bool:
    try:
        official_weights(os.fspath(name))
        return True
    except (GLIPInputError, TypeError):
        return False


def resolve_official(name: str) -> str:
    w = official_weights(name)
    try:
        return hub_file(w.repo, w.filename, f"pretrained GLIP {name!r}")
    except _NotInRepo:
        raise GLIPInputError(f"pretrained GLIP {name!r}: {w.repo} has no file {w.filename!r}") from None


def official_checkpoint(name: str, use_ema: bool = False) -> str:
    """A glip_pl checkpoint of a released GLIP model, converted once into ``GLIP_PL_CACHE``.

    Named after the downloaded blob (its content hash), or the snapshot's revision where the cache holds copies
    instead of links, so a changed upstream file is converted again.
    """
    from .checkpoints.official import import_official

    w = official_weights(name)
    src = resolve_official(name)
    real = Path(src).resolve()
    blob = (real.name if real != Path(src).absolute() else Path(src).parent.name)[:16]
    out = glip_pl_cache_dir() / "official" / f"{Path(w.filename).stem}-{blob}{'-ema' if use_ema else ''}.ckpt"
    if out.is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # renamed into place: other ranks never see half a file
    try:
        import_official(src, tmp, w.preset, use_ema=use_ema)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return str(out)


def is_hub_name(value: str) -> bool:
    return value.startswith(("timm/", "hf-hub:"))


def swin_repo(name: str) -> str:
    """Hub repository of ``timm/ARCH[.TAG]`` or ``hf-hub:ORG/REPO``."""
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):]
    import timm.models

    arch_tag = name[len("timm/"):]
    try:
        cfg = timm.models.get_pretrained_cfg(arch_tag)
    except RuntimeError:  # a known architecture with an unknown tag
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        raise GLIPInputError(
            f"swin__pretrained {name!r}: timm knows no pretrained weights of that name; use e.g. "
            f"{SWIN_FOR_PRESET['glip_t']} or {SWIN_FOR_PRESET['glip_l']}"
        )
    return cfg.hf_hub_id


def resolve_swin(value: str, timm_name: Optional[str] = None) -> str:
    """Local file with ImageNet Swin weights; ``timm_name`` only shapes the suggestion in the error."""
    value = os.fspath(value)
    if os.path.isfile(value):
        return value
    if not is_hub_name(value):
        example = f"timm/{timm_name}" if timm_name else SWIN_FOR_PRESET["glip_t"]
        kind = "a folder, not a weights file" if os.path.isdir(value) else "no such file"
        raise GLIPInputError(
            f"swin__pretrained {value!r}: {kind}; use a timm name such as {example} (downloaded once into the "
            "Hugging Face cache), or download the official file and give its path"
        )
    repo = swin_repo(value)
    what = f"swin__pretrained {value!r}"
    if hf_offline():  # either of timm's formats may be the one in the cache
        from huggingface_hub import try_to_load_from_cache

        for filename in TIMM_WEIGHT_FILES:
            hit = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir())
            if isinstance(hit, str):
                return hit
    for filename in TIMM_WEIGHT_FILES:
        try:
            return hub_file(repo, filename, what)
        except _NotInRepo:
            continue
    raise GLIPInputError(f"{what}: {repo} has none of {', '.join(TIMM_WEIGHT_FILES)}")


__all__ = [
    "OFFICIAL_WEIGHTS",
    "SWIN_FOR_PRESET",
    "OfficialWeights",
    "download_command",
    "hf_cache_dir",
    "hf_offline",
    "hub_file",
    "is_official_name",
    "official_checkpoint",
    "official_weights",
    "resolve_official",
    "resolve_swin",
]
