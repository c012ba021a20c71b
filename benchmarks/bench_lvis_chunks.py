"""Seconds per image for LVIS-style evaluation with 1,203 class names: official protocol vs backbone reuse + packing.

Rows (same model, same images, same run):
  official       40 names per chunk, one full model pass (Swin+FPN, BERT, head) per chunk — GLIP's
                 ``TEST.CHUNKED_EVALUATION 40`` (reference §6)
  official+reuse the same 40-name chunks, image features computed once per image, text features once per chunk
  packed+reuse   as many names per chunk as fit 256 tokens, image features once per image, text once per chunk
                 (``--chunk-batch`` chunks share one head call)
Text features of a chunk do not depend on the image, so their one-off cost (once per evaluation, not per image)
is reported apart. Post-processing (300 detections per 40-name chunk, scaled for packed chunks) is included.

    python benchmarks/bench_lvis_chunks.py                         # tiny preset, CPU, 2 images of 800x1066
    python benchmarks/bench_lvis_chunks.py --images 3 --threads 1  # steadier on a shared CPU machine
    python benchmarks/bench_lvis_chunks.py --preset glip_t --device cuda --images 10
    python benchmarks/bench_lvis_chunks.py --names lvis_v1_val.json  # the real LVIS names (else synthetic)

Without ``--names`` the 1,203 names are synthetic, drawn from the BERT vocabulary with LVIS's token-length mix
(a sample of real LVIS names averages 1.7 word pieces: 47% one, 39% two, 15% three), so chunk counts match LVIS.
Protocols are timed round-robin image by image, so a change in machine load hits each of them alike; the json
(``--out``, default ``benchmarks/results/``) keeps mean and min seconds per image and the run's metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

N_LVIS = 1203


def synthetic_names(tokenizer, n: int = N_LVIS, seed: int = 0) -> list:
    vocab = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 3]
    vocab.sort()
    rng = random.Random(seed)
    names, seen = [], set()
    while len(names) < n:
        k = rng.choices([1, 2, 3], weights=[0.47, 0.39, 0.14])[0]
        name = " ".join(rng.choice(vocab) for _ in range(k))
        if name not in seen and len(tokenizer(name, add_special_tokens=False)["input_ids"]) == k:
            seen.add(name)
            names.append(name)
    return names


def load_names(path: str) -> list:
    p = Path(path)
    if p.suffix == ".json":
        data = json.loads(p.read_text())
        return [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=2, help="timed images per row (after one warm-up image)")
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1066)
    ap.add_argument("--names", default=None, help="LVIS json or a text file with one name per line")
    ap.add_argument("--chunk-batch", type=int, nargs="+", default=[1, 4], help="chunks per head call (packed rows)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default="benchmarks/results/bench_lvis_chunks.json")
    args = ap.parse_args(argv)

    from glip_pl.eval.chunked import EncodedChunks, caption_tokens, detect_chunks
    from glip_pl.eval.lvis import lvis_chunks
    from glip_pl.model import build_glip

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_glip(args.preset).eval().to(device)
    tok = model.tokenizer
    names = load_names(args.names) if args.names else synthetic_names(tok)
    official = lvis_chunks(names, tok, mode="official")
    packed = lvis_chunks(names, tok, mode="packed")
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, args.height, args.width), dtype=torch.uint8, generator=g)
              for _ in range(args.images + 1)]
    post = dict(score_thresh=0.05)

    def tokens(chunks):
        t = [caption_tokens(tok, c.prompt.caption) for c in chunks]
        return sum(t) / len(t)

    configs = [("official", official, False, 1), ("official+reuse", official, True, 1)]
    configs += [("packed+reuse", packed, True, cb) for cb in args.chunk_batch]
    encoded = []
    for label, chunks, reuse, cb in configs:  # text features: once per evaluation (timed apart)
        sync(device)
        t0 = time.perf_counter()
        enc = EncodedChunks(model, chunks, cache_text=reuse)
        sync(device)
        encoded.append((enc, time.perf_counter() - t0 if reuse else 0.0))

    def one(im, cfg, enc):
        _, _, reuse, cb = cfg
        batch, sizes = model.batch_images([im])
        batch, sizes = batch.to(device), sizes.to(device)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = detect_chunks(model, batch, sizes, sizes.tolist(), enc, reuse_backbone=reuse, chunk_batch=cb, **post)
        sync(device)
        return time.perf_counter() - t0, sum(len(d) for d in out[0])

    print(f"{args.preset} on {device}, {len(names)} names, images {args.height}x{args.width}, "
          f"{args.images} timed (+1 warm-up), threads {torch.get_num_threads()}", flush=True)
    for cfg, (enc, _) in zip(configs, encoded):  # warm-up on image 0
        one(images[0], cfg, enc)
    times = [[] for _ in configs]
    ndet = [0 for _ in configs]
    for im in images[1:]:  # round robin, so a change in machine load hits every protocol alike
        for j, (cfg, (enc, _)) in enumerate(zip(configs, encoded)):
            t, n = one(im, cfg, enc)
            times[j].append(t)
            ndet[j] += n
            print(f"  {cfg[0]:<15} x{cfg[3]} {t:.2f} s", flush=True)
    rows = []
    for (label, chunks, reuse, cb), (enc, text_once), ts, n in zip(configs, encoded, times, ndet):
        rows.append({"protocol": label, "chunks": len(chunks), "names_per_chunk": round(len(names) / len(chunks), 1),
                     "mean_tokens": round(tokens(chunks), 1), "chunk_batch": cb, "s_per_image": sum(ts) / len(ts),
                     "s_per_image_min": min(ts), "text_once_s": text_once, "detections_per_image": n / len(ts)})

    base = rows[0]["s_per_image"]
    print()
    print("| protocol | chunks | names/chunk | tokens/chunk | chunks/head call | s/image (mean) | s/image (min) "
          "| speed-up | text, once (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['protocol']} | {r['chunks']} | {r['names_per_chunk']} | {r['mean_tokens']} | {r['chunk_batch']} | "
              f"{r['s_per_image']:.2f} | {r['s_per_image_min']:.2f} | {base / r['s_per_image']:.2f}x | "
              f"{r['text_once_s']:.2f} |")
    meta = {"preset": args.preset, "device": str(device), "device_name": (torch.cuda.get_device_name(device)
            if device.type == "cuda" else platform.processor() or platform.machine()),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "names": args.names or "synthetic",
            "num_names": len(names), "image_size": [args.height, args.width], "timed_images": args.images,
            "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
