"""``glip-pl odinw``: zero-shot or fine-tuned box AP over a folder of many small COCO-format sets (ODinW-13/35).

    glip-pl odinw --root ODINW_DIR --ckpt CKPT [--split valid] [--sets A,B] [--finetune RECIPE] [--out results.json]

Layout (Roboflow exports, as ODinW ships them): ``<set>[/<variant>]/{train,valid,test}/<json>`` with the images
beside the json, where <json> is the official configs' ``annotations_without_background.json`` or Roboflow's
``_annotations.coco.json`` (the former wins when both are there). A set is every folder holding a split folder
with such a json; its name is the path below the root. Roboflow's set-level category (id 0, supercategory
"none", named after the set) is not a class: it is dropped as in ``annotations_without_background.json``.

The default split is the official test split of the ODinW configs: ``mini_val`` where a set has one (EgoHands
generic, VehiclesOpenImages), else ``valid``/``val``. Each set is scored with the class names as the prompt
(``evaluate_model_coco``, chunked past the text limit); with ``--finetune`` it is first fine-tuned on its train
split (shards in the work dir, ``glip-pl fit --config RECIPE ...`` in a subprocess, initialised from CKPT) and the
fine-tuned checkpoint is scored. One table (set, #images, #classes, AP, AP50) and the mean over the sets that ran
are printed and written as json; a set that fails (bad json, missing image, failed run) is reported with its error,
counted, and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

ANNOTATION_NAMES = ("annotations_without_background.json", "_annotations.coco.json")
# split asked for -> folder names that hold it, in order of preference
SPLIT_DIRS = {"train": ("train",), "valid": ("valid", "val"), "val": ("val", "valid"),
              "minival": ("mini_val", "minival"), "test": ("test",)}
OFFICIAL = "official"  # mini_val where present, else valid/val (configs/odinw_*/*.yaml TEST)
ALL_SPLIT_DIRS = tuple(dict.fromkeys(d for dirs in SPLIT_DIRS.values() for d in dirs))


class OdinwError(ValueError):
    """A set that cannot be run; the message names the set, file, record and field."""


# --------------------------------------------------------------------------------------------- discovery


def annotation_file(split_dir: Path) -> Optional[Path]:
    for name in ANNOTATION_NAMES:
        if (split_dir / name).is_file():
            return split_dir / name
    return None


def discover_sets(root) -> list:
    """Set names (paths below ``root``, "/"-separated, sorted): folders with a split folder holding a COCO json."""
    root = Path(root)
    if not root.is_dir():
        raise OdinwError(f"--root {os.fspath(root)!r}: no such folder")
    found = set()
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and any(annotation_file(here / d) for d in dirnames if d in ALL_SPLIT_DIRS):
            found.add(here.relative_to(root).as_posix())
        dirnames[:] = [d for d in dirnames if d not in ALL_SPLIT_DIRS]  # images live there, not sets
    return sorted(found)


def split_dir(set_dir: Path, split: str) -> Path:
    """The folder of ``split`` ("official", "valid", "minival", ...) in a set; OdinwError if it has none."""
    if split == OFFICIAL:
        names = SPLIT_DIRS["minival"] + SPLIT_DIRS["valid"]
    elif split in SPLIT_DIRS:
        names = SPLIT_DIRS[split]
    else:
        names = (split,)
    for n in names:
        if annotation_file(set_dir / n):
            return set_dir / n
    raise OdinwError(f"{os.fspath(set_dir)}: no {split!r} split (looked for {', '.join(n + '/' for n in names)} "
                     f"with {' or '.join(ANNOTATION_NAMES)})")


# --------------------------------------------------------------------------------------------- annotations


def _is_background(cat: dict, others: list) -> bool:
    """Roboflow's set-level category: id 0, supercategory "none", and the real classes beside it."""
    return cat.get("id") == 0 and str(cat.get("supercategory", "")).lower() == "none" and bool(others)


def load_set_json(ann_file: Path) -> tuple:
    """(COCO dict without the background category, name of the dropped category or None), checked so that a bad
    file fails here with the file, record and field named rather than deep in the evaluator."""
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise OdinwError(f"{ann_file}: not valid json ({e})") from None
    if not isinstance(data, dict):
        raise OdinwError(f"{ann_file}: expected a COCO json object, found {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise OdinwError(f"{ann_file}: field {key!r}: a COCO json needs a list here")
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise OdinwError(f"{ann_file}: categories[{i}]: needs an integer 'id' and a string 'name'")
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not im.get("file_name"):
            raise OdinwError(f"{ann_file}: images[{i}]: needs 'id' and 'file_name'")
    dropped = None
    cats = data["categories"]
    bg = [c for c in cats if _is_background(c, [o for o in cats if o is not c])]
    if bg:
        dropped = bg[0]["name"]
        data["categories"] = [c for c in cats if c is not bg[0]]
        stray = [a.get("id") for a in data["annotations"] if a.get("category_id") == 0]
        if stray:  # the official files hold no box of it; one that does cannot be scored as a class
            raise OdinwError(f"{ann_file}: annotation id {stray[0]}: field 'category_id' is 0, the background "
                             f"category {dropped!r} ({len(stray)} such boxes)")
    if not data["categories"]:
        raise OdinwError(f"{ann_file}: field 'categories': no class to detect")
    return data, dropped


def check_images(data: dict, image_dir: Path, ann_file: Path) -> None:
    missing = [im for im in data["images"] if not (image_dir / im["file_name"]).is_file()]
    if missing:
        im = missing[0]
        raise OdinwError(f"{ann_file}: image id {im['id']}: field 'file_name' {im['file_name']!r}: no such file in "
                         f"{os.fspath(image_dir)} ({len(missing)} of {len(data['images'])} images missing)")


# --------------------------------------------------------------------------------------------- fine-tuning


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "set"


def _load_recipes(recipes: Sequence[str]) -> dict:
    """The recipes merged as ``--config a --config b`` would for the keys this module rewrites."""
    import yaml

    merged: dict = {}

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = copy.deepcopy(v)

    for r in recipes:
        try:
            cfg = yaml.safe_load(Path(r).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise OdinwError(f"recipe {r}: cannot be read ({e})") from None
        if not isinstance(cfg, dict):
            raise OdinwError(f"recipe {r}: expected a mapping at the top level")
        merge(merged, cfg)
    return merged


def finetune_overrides(recipe: dict, run_dir: Path, shards: Path, init_ckpt: str, val_split: str) -> dict:
    """The last ``--config`` of a set's fit: its shards, the init weights, and run/checkpoint/logger folders of its
    own (the recipe's fixed ``runs/...`` paths would mix the sets)."""
    trainer = recipe.get("trainer") or {}
    data = recipe.get("data") or {}
    train = dict((data.get("train") or [{}])[0] or {}, urls=str(shards), split="train")
    train.setdefault("prompt_mode", "all")  # official fine-tune prompt: all class names in id order
    val = dict((data.get("val") or [{}])[0] or {}, urls=str(shards), split=val_split)
    out = {"trainer": {"default_root_dir": str(run_dir)}, "model": {"init_weights": str(init_ckpt)},
           "data": {"train": [train], "val": [val]}}
    callbacks = copy.deepcopy(trainer.get("callbacks"))
    if isinstance(callbacks, list):
        for cb in callbacks:
            args = cb.get("init_args") if isinstance(cb, dict) else None
            if isinstance(args, dict) and "dirpath" in args:
                args["dirpath"] = str(run_dir / "checkpoints")
        out["trainer"]["callbacks"] = callbacks
    logger = copy.deepcopy(trainer.get("logger"))
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        logger["init_args"].update({k: v for k, v in (("save_dir", str(run_dir)), ("name", run_dir.name))
                                    if k in logger["init_args"]})
        out["trainer"]["logger"] = logger
    return out


def finetuned_checkpoint(run_dir: Path) -> Path:
    """The checkpoint the recipe kept: the monitored best (``save_top_k``) when there is one, else last.ckpt."""
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    best = [p for p in ckpts if not p.name.startswith("last")]
    if best:
        return best[-1]
    if ckpts:
        return ckpts[-1]
    raise OdinwError(f"fine-tuning wrote no checkpoint in {run_dir / 'checkpoints'}")


def finetune_set(name: str, set_dir: Path, work: Path, recipes: Sequence[str], init_ckpt: str,
                 eval_dir: Path, fit_args: Sequence[str] = (), print_fn: Callable = print) -> Path:
    """Shards of the set's train (+ valid) split, ``glip-pl fit`` from ``init_ckpt``; the fine-tuned checkpoint."""
    from ..data.convert_coco import convert_coco
    from ..data.schema import ConversionError

    run_dir = (work / _slug(name)).resolve()  # absolute: the recipes may be read from another folder
    shards = run_dir / "shards"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        val_dir = split_dir(set_dir, "valid")
    except OdinwError:
        val_dir = eval_dir
    for split, d in (("train", split_dir(set_dir, "train")), ("val", val_dir)):
        ann = annotation_file(d)
        data, _ = load_set_json(ann)
        check_images(data, d, ann)
        clean = run_dir / f"{split}.json"  # the background category dropped, as the shards must not list it
        clean.write_text(json.dumps(data))
        try:
            convert_coco(str(clean), str(d), str(shards), split, source=_slug(name), overwrite=True, progress=False,
                         num_workers=1)
        except ConversionError as e:
            raise OdinwError(f"{ann}: {e}") from None
    cfg = run_dir / "odinw_overrides.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(finetune_overrides(_load_recipes(recipes), run_dir, shards, Path(init_ckpt).resolve(),
                                                     "val"),
                                  sort_keys=False))
    cmd = [sys.executable, "-m", "glip_pl.cli", "fit"]
    for r in recipes:
        cmd += ["--config", str(r)]
    cmd += ["--config", str(cfg), *fit_args]
    log = run_dir / "fit.log"
    print_fn(f"[odinw] {name}: fine-tuning ({' '.join(cmd[2:])}), log {log}")
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ))
    if r.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise OdinwError(f"glip-pl fit exited with {r.returncode} (log {log}):\n    " + "\n    ".join(tail))
    return finetuned_checkpoint(run_dir)


# --------------------------------------------------------------------------------------------- evaluation


def evaluate_set(predictor, data: dict, image_dir: Path, **kw) -> dict:
    from .zero_shot import evaluate_model_coco

    metrics = evaluate_model_coco(predictor, data, image_root=str(image_dir), verbose=False, **kw)
    metrics.pop("detections", None)
    return metrics


def run_odinw(root, ckpt, split: str = OFFICIAL, sets: Optional[Sequence[str]] = None,
              finetune: Optional[Sequence[str]] = None, work_dir=None, fit_args: Sequence[str] = (),
              predictor_kw: Optional[dict] = None, print_fn: Callable = print) -> dict:
    """Score every set (or ``sets``) of ``root``; the results dict (see the module docstring)."""
    from .predictor import Predictor

    root = Path(root)
    if not Path(ckpt).is_file():  # before any set is converted or fine-tuned
        raise OdinwError(f"--ckpt {os.fspath(ckpt)!r}: no such file")
    names = discover_sets(root)
    if sets:
        unknown = [s for s in sets if s not in names]
        if unknown:
            raise OdinwError(f"--sets: {unknown} not found under {os.fspath(root)}; found {names}")
        names = [s for s in names if s in sets]
    if not names:
        raise OdinwError(f"{os.fspath(root)}: no set found (a folder with {'/'.join(ALL_SPLIT_DIRS)} sub-folders "
                         f"holding {' or '.join(ANNOTATION_NAMES)})")
    predictor_kw = dict(predictor_kw or {})
    zero_shot = None if finetune else Predictor.from_checkpoint(ckpt, **predictor_kw)
    work = Path(work_dir or "runs/odinw")
    rows, failed = [], []
    for name in names:
        set_dir = root / name
        try:
            d = split_dir(set_dir, split)
            ann = annotation_file(d)
            data, dropped = load_set_json(ann)
            check_images(data, d, ann)
            row = {"set": name, "split": d.name, "ann_file": str(ann), "images": len(data["images"]),
                   "classes": len(data["categories"]), "background_dropped": dropped}
            if finetune:
                tuned = finetune_set(name, set_dir, work, finetune, ckpt, d, fit_args, print_fn)
                row["checkpoint"] = str(tuned)
                predictor = Predictor.from_checkpoint(tuned, **predictor_kw)
            else:
                predictor = zero_shot
            m = evaluate_set(predictor, data, d)
            row.update(AP=m["AP"], AP50=m["AP50"], metrics=m)
            rows.append(row)
            print_fn(f"[odinw] {name} ({d.name}): AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}")
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one broken set must not stop the others; the error travels to the report
            msg = str(e) if isinstance(e, OdinwError) else f"{type(e).__name__}: {e}"
            failed.append({"set": name, "error": msg})
            print_fn(f"[odinw] {name}: FAILED: {msg}")
    avg = {"sets": len(rows)}
    for k in ("AP", "AP50"):
        avg[k] = sum(r[k] for r in rows) / len(rows) if rows else None
    return {"root": str(root), "checkpoint": str(ckpt), "split": split, "finetune": list(finetune or []),
            "sets": rows, "failed": failed, "average": avg}


def format_results(res: dict) -> str:
    width = max([len("set")] + [len(r["set"]) for r in res["sets"]] + [len(f["set"]) for f in res["failed"]])
    lines = [f"{'set':<{width}}  {'split':<8} {'#images':>7} {'#classes':>8} {'AP':>7} {'AP50':>7}"]
    for r in res["sets"]:
        lines.append(f"{r['set']:<{width}}  {r['split']:<8} {r['images']:>7} {r['classes']:>8} "
                     f"{100 * r['AP']:7.2f} {100 * r['AP50']:7.2f}")
    for f in res["failed"]:
        lines.append(f"{f['set']:<{width}}  FAILED: {f['error']}")
    a = res["average"]
    ap = "      -" if a["AP"] is None else f"{100 * a['AP']:7.2f}"
    ap50 = "      -" if a["AP50"] is None else f"{100 * a['AP50']:7.2f}"
    label = f"average ({a['sets']} sets" + (f", {len(res['failed'])} failed)" if res["failed"] else ")")
    lines.append(f"{label:<{width}}  {'':<8} {'':>7} {'':>8} {ap} {ap50}")
    return "\n".join(lines)


__all__ = ["OdinwError", "discover_sets", "split_dir", "load_set_json", "run_odinw", "format_results",
           "finetune_overrides"]
