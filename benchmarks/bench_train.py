"""End-to-end training throughput and the data-wait fraction of a real ``glip-pl fit`` run.

Runs the CPU smoke recipe (``recipes/local/cpu_smoke.yaml``: tiny preset, synthetic shards, batch 4, multi-scale
224-288 px) through the real CLI, once per data-worker count, with ``ThroughputMonitor`` logging to a CSV logger,
and reports images/s and the fraction of step time the training loop spent waiting for the next batch. The first
logging window (worker start-up, first-step allocations) is left out.

    python benchmarks/bench_train.py                              # CPU, workers 0 1 2, 60 steps each
    python benchmarks/bench_train.py --workers 2 4 --steps 200 --recipe recipes/pretrain/glip_t.yaml \\
        --shards /data/shards --extra --trainer.accelerator=gpu --trainer.devices=1

Prints a table and writes json (default benchmarks/results/bench_train.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_common import git_commit

REPO = Path(__file__).resolve().parents[1]


def make_recipe(base: Path, out: Path, shards: str, workers: int, steps: int, every: int) -> Path:
    from glip_pl.lit.recipes import load_recipe

    cfg = load_recipe(base)  # a pretrain row with its __base__ merged in: the copy is read from another folder
    run = out / f"workers{workers}"
    tr = cfg["trainer"]
    tr.update(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
              default_root_dir=str(run), log_every_n_steps=every, enable_checkpointing=False)
    tr.pop("val_check_interval", None)
    tr["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run),
                                                                                        "name": "csv"}}
    tr["callbacks"] = [{"class_path": "glip_pl.lit.callbacks.ThroughputMonitor",
                        "init_args": {"log_every_n_steps": every}}]
    data = cfg["data"].get("init_args", cfg["data"])  # glip_t / glip_l name their data module class
    for src in data["train"]:
        src["urls"] = src["urls"].replace("shards/synthetic", shards)
    data["val"] = []
    data["num_workers"] = workers
    path = out / f"workers{workers}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_windows(run: Path) -> list:
    files = sorted(run.glob("csv/version_*/metrics.csv"))
    if not files:
        raise RuntimeError(f"no metrics.csv under {run}")
    rows = []
    with open(files[-1]) as f:
        for r in csv.DictReader(f):
            if r.get("perf/data_wait_fraction"):
                rows.append({k: float(r[k]) for k in ("step", "perf/data_wait_fraction", "perf/images_per_s",
                                                      "perf/data_wait_s", "perf/compute_s")})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(REPO / "recipes/local/cpu_smoke.yaml"))
    p.add_argument("--shards", default=None, help="synthetic shard root (default: generate 256 scenes in a temp dir)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10, help="ThroughputMonitor window (steps)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more glip-pl fit arguments")
    p.add_argument("--out", default="benchmarks/results/bench_train.json")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    shards = args.shards
    if shards is None:
        from glip_pl.data.synthetic import generate_synthetic

        shards = str(tmp / "shards")
        generate_synthetic(shards, splits={"train": 256}, seed=0, samples_per_shard=32, num_workers=2,
                           progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    rows = []
    for k in args.workers:
        cfg = make_recipe(Path(args.recipe), tmp, shards, k, args.steps, args.every)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "glip_pl.cli", "fit", "--config", str(cfg), *args.extra],
                           capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            rows.append({"workers": k, "error": r.stderr.strip().splitlines()[-1] if r.stderr else "failed"})
            continue
        win = read_windows(tmp / f"workers{k}")[1:]  # drop the start-up window
        wait = sum(w["perf/data_wait_s"] for w in win)
        comp = sum(w["perf/compute_s"] for w in win)
        images = sum(w["perf/images_per_s"] * (w["perf/data_wait_s"] + w["perf/compute_s"]) for w in win)
        rows.append({"workers": k, "windows": len(win), "steps": args.steps, "wall_s": wall,
                     "images_per_s": images / (wait + comp), "data_wait_fraction": wait / (wait + comp),
                     "step_s": (wait + comp) / (len(win) * args.every)})
        print(f"  workers {k}: {rows[-1]['images_per_s']:.2f} img/s, data wait "
              f"{100 * rows[-1]['data_wait_fraction']:.1f}%", file=sys.stderr, flush=True)

    print(f"\nrecipe={args.recipe} steps={args.steps} (first {args.every}-step window dropped) "
          f"commit={git_commit()} host={platform.node()}")
    print(f"{'workers':>7s} {'step s':>8s} {'img/s':>7s} {'data wait':>9s} {'wall s':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['workers']:7d} ERROR {r['error']}")
            continue
        print(f"{r['workers']:7d} {r['step_s']:8.3f} {r['images_per_s']:7.2f} {100 * r['data_wait_fraction']:8.1f}% "
              f"{r['wall_s']:7.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/bench_train.py " + " ".join(argv or sys.argv[1:]),
                               "commit": git_commit(), "host": platform.node(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
