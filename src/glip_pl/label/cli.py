"""``glip-pl pseudo-label --config recipes/label/<name>.yaml``: label caption shards with a teacher GLIP.

The YAML holds ``LabelConfig`` fields (``teacher``, ``input``, ``split``, ``output``, ``phrases: {...}``,
``filters: {...}``, ``trainer``-like ``accelerator/devices/num_nodes/strategy/precision``); several ``--config``
files are merged left to right (a recipe + a cluster file), and the flags below override them. Under Slurm, launch
one task per GPU with ``srun`` (``scripts/slurm/pseudo_label.sh``): every rank labels its own shards.
"""

from __future__ import annotations

import argparse


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(paths, overrides: dict):
    import yaml

    from .job import LabelConfig

    d: dict = {}
    for p in paths or []:
        with open(p) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{p}: a pseudo-label config must be a mapping")
        d = _merge(d, loaded)
    for k, v in overrides.items():
        if v is None:
            continue
        if "." in k:
            top, sub = k.split(".", 1)
            d.setdefault(top, {})[sub] = v
        else:
            d[k] = v
    try:
        return LabelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"pseudo-label config: {e}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("pseudo-label", help="pseudo-label caption shards with a teacher GLIP (resumable)")
    p.add_argument("--config", "-c", action="append", default=[], help="YAML config (repeatable, merged in order)")
    p.add_argument("--teacher", help="teacher checkpoint (or a run's checkpoint folder: its last.ckpt)")
    p.add_argument("--input", help="caption shards (folder, brace pattern)")
    p.add_argument("--split", help="input split when --input is a folder (train)")
    p.add_argument("--output", help="output folder of the pseudo-labelled grounding shards")
    p.add_argument("--devices", help="Lightning devices per node (auto)")
    p.add_argument("--num-nodes", type=int, dest="num_nodes", help="nodes of a multi-node job (1)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="images per teacher batch and device (8)")
    p.add_argument("--num-workers", type=int, dest="num_workers", help="data-loader workers per device (1)")
    p.add_argument("--score-thresh", type=float, dest="filters.score_thresh",
                   help="keep teacher boxes scoring above this (0.5, official CAPTION_CONF)")
    p.add_argument("--top-k", type=int, dest="filters.top_k", help="keep at most K boxes per phrase")
    p.add_argument("--nms-thresh", type=float, dest="filters.nms_thresh", help="per-phrase NMS IoU threshold")
    p.add_argument("--cross-phrase-nms", type=float, dest="filters.cross_phrase_nms", metavar="IOU",
                   help="class-agnostic NMS before top-k: one object, one phrase (off by default, as official)")
    p.add_argument("--min-boxes", type=int, dest="filters.min_boxes", help="skip captions with fewer kept boxes")
    p.add_argument("--unboxed-phrase", choices=("keep", "skip", "ignore"), dest="filters.unboxed_phrase",
                   help="a caption with a phrase left without a box: keep it (official), skip it, or keep it with a "
                        "whole-image ignore region for that phrase")
    p.add_argument("--ignore-thresh", type=float, dest="filters.ignore_thresh", metavar="SCORE",
                   help="unkept teacher boxes scoring above SCORE become ignore regions for their phrase (no "
                        "negative loss there); off by default, as official")
    p.add_argument("--spacy-model", dest="phrases.model", help="spaCy pipeline (package name or path) for noun phrases")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an output folder that holds another labelling's shards (other input, teacher or "
                        "options; default: refuse)")
    p.add_argument("--wandb", action="store_true", default=None, help="log the quality summary to W&B")
    p.set_defaults(func=run)


_FLAG_KEYS = ("teacher", "input", "split", "output", "devices", "num_nodes", "batch_size", "num_workers",
              "filters.score_thresh", "filters.top_k", "filters.nms_thresh", "filters.cross_phrase_nms",
              "filters.min_boxes", "filters.unboxed_phrase", "filters.ignore_thresh", "phrases.model", "overwrite",
              "wandb")


def flag_overrides(args: argparse.Namespace) -> dict:
    """The command-line flags as ``load_config`` overrides (unset flags are None and leave the config alone)."""
    overrides = {k: getattr(args, k, None) for k in _FLAG_KEYS}
    if overrides.get("devices") is not None and str(overrides["devices"]).isdigit():
        overrides["devices"] = int(overrides["devices"])
    return overrides


def run(args: argparse.Namespace) -> int:
    import torch

    from ..model.types import GLIPInputError
    from ..run_lock import RunLock, RunLockHeld
    from .job import _rank_world, run_label
    from .phrases import SpacyModelMissing

    torch.set_num_threads(1) if not torch.cuda.is_available() else None
    cfg = load_config(args.config, flag_overrides(args))
    # one labelling job per output folder (rank 0 holds the lock; the other ranks write their own shards)
    lock = RunLock(cfg.output, "glip-pl pseudo-label") if cfg.output and _rank_world()[0] == 0 else None
    try:
        if lock is not None:
            lock.acquire()
        result = run_label(cfg)
    except (SpacyModelMissing, GLIPInputError, FileNotFoundError, FileExistsError, RunLockHeld) as e:
        raise SystemExit(f"pseudo-label: {e}") from None
    finally:
        if lock is not None:
            lock.release()
    return 0 if result["entry"] is not None or result["done"] is not None else 1
