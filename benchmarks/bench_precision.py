"""Mixed precision on the real presets: one forward + loss + backward in fp32, under bf16 autocast, and under fp16
autocast with a GradScaler, from the same random weights and inputs.

Per mode: each loss term's and the gradient norm's relative difference to fp32, whether every loss term and
gradient is finite, and the step time as a ratio to fp32's (same process, same inputs). Dropout, DropBlock and drop
path are off so the three modes compute the same function. The prompt of every image is the COCO 80-class
detection prompt (as the official COCO evaluation builds it).

    python benchmarks/bench_precision.py                                  # glip_t and glip_l, 320², batch 2, CPU
    python benchmarks/bench_precision.py --presets glip_t --size 800 --device cuda --reps 5

On CPU, autocast's op list differs from CUDA's (which ops it lowers, which it keeps in fp32), and a CPU without
bf16/fp16 instructions emulates them: the CPU times say nothing about a GPU's, and the differences are CPU
autocast's. Prints a markdown table and writes json (default benchmarks/results/bench_precision.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import git_commit  # noqa: E402
from bench_inference import coco_names  # noqa: E402

MODES = ("fp32", "bf16", "fp16")
TERMS = ("loss_token", "loss_reg", "loss_centerness")


def build(preset: str, device: str):
    from glip_pl.model import build_glip

    torch.manual_seed(0)
    model = build_glip(preset, dropblock=False, fusion_dropout=0.0, swin__drop_path_rate=0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.to(device).train()


def inputs(model, size: int, batch: int, device: str):
    """Random uint8 images, the COCO prompt per image, 3 boxes per image labelled with the first classes."""
    from glip_pl.model import make_targets
    from glip_pl.model.prompts import build_detection_prompt, spans_to_token_map

    g = torch.Generator().manual_seed(0)
    images, sizes = model.batch_images([torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
                                        for _ in range(batch)])
    prompt = build_detection_prompt(coco_names())
    text, offsets = model.tokenize([prompt.caption] * batch)
    tmap = spans_to_token_map(prompt.caption, prompt.spans, offsets[0], text.length)
    s = size
    boxes = torch.tensor([[0.1 * s, 0.1 * s, 0.5 * s, 0.6 * s], [0.4 * s, 0.3 * s, 0.9 * s, 0.8 * s],
                          [0.2 * s, 0.5 * s, 0.45 * s, 0.95 * s]])
    targets = make_targets([boxes] * batch, [tmap[[0, 2, 56]]] * batch, text.length)  # person, car, chair
    return images.to(device), sizes.to(device), text.to(device), targets.to(device)


def step(model, batch, mode: str, device: str) -> dict:
    """One forward + loss + backward; loss terms, unscaled gradient norm, finiteness and seconds."""
    images, sizes, text, targets = batch
    model.zero_grad(set_to_none=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    scaler = torch.amp.GradScaler(device, enabled=mode == "fp16")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # only for GradScaler.unscale_
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    ctx = torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with ctx:
        terms = model.loss(model(images, sizes, text), targets)
        total = model.criterion.total(terms)
    scaler.scale(total).backward()
    sync()
    seconds = time.perf_counter() - t0
    scaler.unscale_(opt)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = all(bool(torch.isfinite(g).all()) for g in grads) and all(bool(torch.isfinite(v)) for v in terms.values())
    norm = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
    return {"terms": {k: v.item() for k, v in terms.items()}, "grad_norm": norm, "finite": finite,
            "seconds": seconds, "tokens": int(text.length)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["glip_t", "glip_l"])
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1, help="timed steps per mode (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per mode before the timed ones")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="fp32 always runs (the baseline)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_precision.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    modes = ["fp32"] + [m for m in args.modes if m != "fp32"]
    rows = []
    for preset in args.presets:
        model = build(preset, args.device)
        batch = inputs(model, args.size, args.batch, args.device)
        res = {}
        for mode in modes:
            for _ in range(args.warmup):  # allocations, oneDNN kernel plans
                step(model, batch, mode, args.device)
            runs = [step(model, batch, mode, args.device) for _ in range(args.reps)]
            r = runs[0]
            r["seconds"] = sorted(x["seconds"] for x in runs)[len(runs) // 2]
            res[mode] = r
            print(f"{preset} {mode}: {r['seconds']:.2f} s, terms {r['terms']}, grad norm {r['grad_norm']:.6g}, "
                  f"finite {r['finite']}", flush=True)
        ref = res["fp32"]
        for mode in modes:
            r = res[mode]
            rows.append({
                "preset": preset, "mode": mode, "tokens": r["tokens"], "finite": r["finite"],
                "rel_diff": {k: abs(r["terms"][k] - ref["terms"][k]) / abs(ref["terms"][k]) for k in TERMS},
                "grad_norm_rel_diff": abs(r["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"],
                "seconds": r["seconds"], "time_vs_fp32": r["seconds"] / ref["seconds"], "terms": r["terms"],
                "grad_norm": r["grad_norm"],
            })
        del model, batch

    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n{args.size}x{args.size}, batch {args.batch}, COCO 80-class prompt, device {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, commit {git_commit()}, "
          f"peak RSS {peak_gib:.1f} GiB\n")
    print("| preset | mode | T | loss_token | loss_reg | loss_centerness | grad norm | finite | step s | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = r["rel_diff"]
        diffs = " | ".join("—" if r["mode"] == "fp32" else f"{d[k]:.1e}" for k in TERMS)
        gn = "—" if r["mode"] == "fp32" else f"{r['grad_norm_rel_diff']:.1e}"
        print(f"| {r['preset']} | {r['mode']}{' + GradScaler' if r['mode'] == 'fp16' else ''} | {r['tokens']} | "
              f"{diffs} | {gn} | {'yes' if r['finite'] else 'NO'} | {r['seconds']:.1f} | {r['time_vs_fp32']:.2f}× |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "commit": git_commit(), "torch": torch.__version__,
                               "machine": platform.processor() or platform.machine(), "peak_rss_gib": peak_gib,
                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
