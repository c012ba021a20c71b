"""Inference throughput through ``Predictor``: images/s for one prompt (the 80 COCO class names, one chunk), one
image per call vs. batched, and fp32 vs. bf16 autocast on GPU. (LVIS-scale chunked prompts:
``bench_lvis_chunks.py``.) Rows are timed round-robin, image batch by image batch, so machine load hits them alike.

    python benchmarks/bench_inference.py                                  # tiny, CPU, 800x1066, 4 images
    python benchmarks/bench_inference.py --preset glip_t --device cuda --images 32 --dtype fp32 bf16

Prints a table and writes json (default benchmarks/results/bench_inference.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_common import git_commit  # noqa: E402

COCO = ("person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking meter "
        "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
        "skis snowboard sports ball kite baseball bat baseball glove skateboard surfboard tennis racket bottle wine "
        "glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot dog pizza donut cake chair "
        "couch potted plant bed dining table toilet tv laptop mouse remote keyboard cell phone microwave oven toaster "
        "sink refrigerator book clock vase scissors teddy bear hair drier toothbrush")
COCO_NAMES = ["traffic light", "fire hydrant", "stop sign", "parking meter", "sports ball", "baseball bat",
              "baseball glove", "tennis racket", "wine glass", "hot dog", "potted plant", "dining table", "cell phone",
              "teddy bear", "hair drier"]


def coco_names() -> list:
    text = COCO
    for n in COCO_NAMES:
        text = text.replace(n, n.replace(" ", "_"))
    names = [w.replace("_", " ") for w in text.split()]
    assert len(names) == 80, len(names)
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=4, help="timed images per row (after one warm-up batch)")
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1066)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="images per predict_batch call")
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/bench_inference.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from PIL import Image

    from glip_pl.eval.predictor import Predictor
    from glip_pl.model import build_glip

    torch.manual_seed(0)
    pred = Predictor(build_glip(args.preset), device=args.device, min_size=args.height, max_size=args.width)
    prompt = ". ".join(coco_names())
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (args.height, args.width, 3), generator=g,
                                            dtype=torch.uint8).numpy()) for _ in range(max(args.batch))]
    dev = torch.device(args.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rows = [{"batch": b, "dtype": d, "seconds": 0.0, "images": 0} for d in args.dtype for b in args.batch]

    def run(row, n):
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if row["dtype"] == "bf16" else contextlib.nullcontext()
        with ctx, torch.inference_mode():
            return pred.predict_batch(images[:n], prompt, batch_size=row["batch"])  # calls of row["batch"] images

    for row in rows:  # warm-up (allocations, cudnn autotune, text features)
        run(row, row["batch"])
    done, n = 0, max(args.batch)
    while done < args.images:
        for row in rows:
            sync()
            t0 = time.perf_counter()
            run(row, n)
            sync()
            row["seconds"] += time.perf_counter() - t0
            row["images"] += n
        done += n
    base = rows[0]["seconds"] / rows[0]["images"]
    print(f"\npreset={args.preset} device={args.device} input={args.height}x{args.width} prompt=80 COCO names "
          f"commit={git_commit()}")
    print(f"{'dtype':>5s} {'batch':>5s} {'images':>6s} {'s/image':>8s} {'img/s':>7s} {'speed-up':>8s}")
    for r in rows:
        per = r["seconds"] / r["images"]
        r["seconds_per_image"], r["images_per_s"] = per, 1 / per
        print(f"{r['dtype']:>5s} {r['batch']:5d} {r['images']:6d} {per:8.3f} {1 / per:7.2f} {base / per:7.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/bench_inference.py " + " ".join(argv or sys.argv[1:]),
                               "commit": git_commit(), "device": args.device, "host": platform.node(),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
