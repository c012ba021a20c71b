"""``glip-pl demo``: shards, training, box AP and pictures on a laptop CPU in minutes, through the same LightningCLI
as cluster runs (``recipes/local/demo.yaml``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train the tiny model on synthetic shards on CPU and evaluate it")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "local" / "demo.yaml"),
                   help="training recipe (recipes/local/demo.yaml)")
    p.add_argument("--shards", default=str(ROOT / "shards" / "synthetic"),
                   help="synthetic shards folder, made there when missing (shards/synthetic)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's trainer.max_steps")
    p.add_argument("--fresh", action="store_true", help="start a new run instead of resuming runs/demo")
    p.add_argument("--pictures", type=int, default=4, help="validation images to draw predictions on")
    p.set_defaults(func=run_demo)


def _ensure_shards(root: Path) -> None:
    if all((root / f / "index.json").exists() for f in ("detection", "grounding")):
        print(f"[demo] synthetic shards: {root} (already there)")
        return
    from glip_pl.data.synthetic import generate_synthetic

    t = time.perf_counter()
    generate_synthetic(str(root), flavours=("detection", "grounding", "caption"),
                       splits={"train": 512, "val": 64}, seed=0, progress=False)
    print(f"[demo] made synthetic shards in {root} ({time.perf_counter() - t:.0f} s)")


def _draw(ckpt: Path, shards: Path, out: Path, n: int) -> list:
    from glip_pl.data import iter_samples
    from glip_pl.eval.draw import draw_prediction
    from glip_pl.eval.predictor import Predictor

    pred = Predictor.from_checkpoint(str(ckpt), min_size=256, max_size=512)
    index = json.loads((shards / "detection" / "index.json").read_text())
    names = [c["name"] for c in sorted(index["categories"], key=lambda c: c["id"])]
    prompt = ". ".join(names)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, sample in enumerate(iter_samples(str(shards / "detection"), split="val")):
        if i >= n:
            break
        p = pred.predict(sample.image, prompt)
        img = draw_prediction(sample.image, p, threshold=0.3)
        path = out / f"val_{i:02d}.png"
        img.save(path)
        written.append(path)
    return written


def _set_aside(recipe: Path) -> None:
    """``--fresh``: move the previous run aside, never delete it. Left in place, its ``last.ckpt`` would make the new
    run write ``last-v1.ckpt``, and the pictures and a later re-run would use the old one."""
    import yaml

    root = (yaml.safe_load(recipe.read_text()) or {}).get("trainer", {}).get("default_root_dir")
    if not root or not Path(root).exists():
        return
    old = Path(root)
    dest = old.with_name(f"{old.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
    old.rename(dest)
    print(f"[demo] --fresh: previous run moved to {dest}")


def run_demo(args: argparse.Namespace) -> int:
    from glip_pl.lit.cli import GLIPCLI
    from glip_pl.lit.datamodule import GroundingDataModule
    from glip_pl.lit.module import GLIPLitModule

    recipe = Path(args.recipe)
    if not recipe.exists():
        raise SystemExit(f"demo recipe {recipe} not found (run from a checkout, or pass --recipe)")
    shards = Path(args.shards)
    _ensure_shards(shards)
    cli_args = ["fit", "--config", str(recipe),
                "--data.train", json.dumps([{"urls": str(shards / "detection")}, {"urls": str(shards / "grounding")}]),
                "--data.val", json.dumps([{"urls": str(shards / "detection"), "split": "val"}])]
    if args.steps:
        cli_args += ["--trainer.max_steps", str(args.steps)]
    if args.fresh:
        cli_args += ["--ckpt_path", "none"]
        _set_aside(recipe)
    t = time.perf_counter()
    cli = GLIPCLI(GLIPLitModule, GroundingDataModule, args=cli_args, seed_everything_default=1234,
                  save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    minutes = (time.perf_counter() - t) / 60
    run_dir = Path(cli.trainer.default_root_dir)
    # Lightning stops at max_steps before a validation scheduled on that step: evaluate the final weights here.
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = cli.model.last_val_metrics
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    pictures = _draw(ckpt, shards, run_dir / "predictions", args.pictures) if args.pictures else []
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    (run_dir / "demo_metrics.json").write_text(json.dumps(metrics, indent=2))
    print()
    print("=" * 72)
    print(f"glip_pl demo: tiny GLIP trained {cli.trainer.global_step} steps on CPU in {minutes:.1f} min")
    print(f"  synthetic val box AP {100 * metrics['AP']:.1f}   AP50 {100 * metrics['AP50']:.1f}   "
          f"AP75 {100 * metrics['AP75']:.1f}   (COCO-style, class names as the prompt)")
    print(f"  checkpoint:   {ckpt}")
    print(f"  predictions:  {run_dir / 'predictions'} ({len(pictures)} pictures)")
    if wandb_runs:
        print(f"  W&B (offline): {wandb_runs[-1]}  — upload with: wandb sync {wandb_runs[-1]}")
    print(f"  metrics json: {run_dir / 'demo_metrics.json'}")
    print("=" * 72)
    return 0
