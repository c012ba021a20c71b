"""Roofline estimate of one GLIP training step on a GPU, without a GPU: every aten op of forward + loss + backward
runs on fake tensors (benchmarks/memory_plan.py's meta build + fake swap, model cast to bf16) and is given
time = max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), bytes = its tensor inputs + outputs (views move nothing),
FLOPs from ``torch.utils.flop_counter``'s formulas (modulated deformable convs counted as the dense 3x3 conv they
replace, as benchmarks/count_flops.py does). Summed per part: image backbone, text encoder, fusion, rest of the head,
loss. An ESTIMATE: it assumes every kernel reaches the roofline (no launch gaps, no host syncs, no fusion of
elementwise ops beyond what eager runs); the op count times a per-launch cost is reported beside it, because on a
GPU that floor dominates short kernels.

Attention runs in its plain form (as count_flops.py: the fake CPU SDPA kernels are invisible to the FLOP counter),
so the bytes include score matrices that a flash kernel would not write (small here: T is tens of tokens).

    python benchmarks/roofline.py                                   # glip_t, 800x1333, batch 2, ~40-token prompt
    python benchmarks/roofline.py --preset glip_t --batch 2 --peak-tflops 989 --hbm-tbs 3.35 --launch-us 8

Prints a table and writes json (default benchmarks/results/roofline.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, shape_wrapper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory_plan  # noqa: E402

PARTS = ("image backbone", "text encoder", "fusion", "head rest", "loss + other")


def part_of(parents: set) -> str:
    names = " ".join(parents)
    if ".b_attn" in names:
        return "fusion"
    if "GLIP.backbone" in names:
        return "image backbone"
    if "GLIP.language_backbone" in names:
        return "text encoder"
    if "GLIP.head" in names:
        return "head rest"
    return "loss + other"


class RooflineMode(TorchDispatchMode):
    def __init__(self, tracker, peak_flops: float, bandwidth: float):
        super().__init__()
        import count_flops

        self.tracker, self.peak, self.bw = tracker, peak_flops, bandwidth
        self.formulas = dict(flop_registry)
        tv = getattr(torch.ops, "torchvision", None)
        if tv is not None and hasattr(tv, "deform_conv2d"):
            self.formulas[tv.deform_conv2d] = shape_wrapper(count_flops._deform)
            self.formulas[tv._deform_conv2d_backward] = shape_wrapper(count_flops._deform_backward)
        self.stats = {p: {"flops": 0, "bytes": 0, "ops": 0, "compute_s": 0.0, "memory_s": 0.0, "time_s": 0.0}
                      for p in PARTS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in ("aten", "torchvision") and not func.is_view and func is not torch.ops.aten.detach.default:
            fl = 0
            f = self.formulas.get(func._overloadpacket)
            if f is not None:
                fl = int(f(*args, **kwargs, out_val=out))
            nbytes = sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs, out))[0]
                         if isinstance(t, torch.Tensor))
            s = self.stats[part_of(self.tracker.parents)]
            c, m = fl / self.peak, nbytes / self.bw
            s["flops"] += fl
            s["bytes"] += nbytes
            s["ops"] += 1
            s["compute_s"] += c
            s["memory_s"] += m
            s["time_s"] += max(c, m)
        return out


def estimate(preset: str, h: int, w: int, batch: int, prompt_tokens: int, peak_tflops: float, hbm_tbs: float) -> dict:
    from torch.distributed._tools.mod_tracker import ModTracker

    model = memory_plan.build_meta(preset, "none", use_sdpa=False).to(torch.bfloat16)
    memory_plan._bf16_inputs(model)
    mode = memory_plan.make_fake(model)
    images, sizes, text, targets = memory_plan.synthetic_batch(model, batch, h, w, prompt_tokens)
    tracker = ModTracker()
    rm = RooflineMode(tracker, peak_tflops * 1e12, hbm_tbs * 1e12)
    t0 = time.perf_counter()
    with mode, tracker, rm:
        out = model(images, sizes, text)
        loss = model.criterion.total(model.loss(out, targets))
        loss.backward()
    return {"preset": preset, "h": h, "w": w, "batch": batch, "text_len": int(text.length),
            "peak_tflops": peak_tflops, "hbm_tbs": hbm_tbs, "parts": rm.stats, "trace_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glip_t")
    ap.add_argument("--size", default="800x1333")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=40)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 (H100 SXM: 989)")
    ap.add_argument("--hbm-tbs", type=float, default=3.35, help="HBM bandwidth, TB/s (H100 SXM: 3.35)")
    ap.add_argument("--launch-us", type=float, default=8.0, help="per-kernel launch + eager dispatch cost, µs")
    ap.add_argument("--out", default="benchmarks/results/roofline.json")
    args = ap.parse_args(argv)
    hw = args.size.lower().split("x")
    r = estimate(args.preset, int(hw[0]), int(hw[-1]), args.batch, args.prompt_tokens, args.peak_tflops, args.hbm_tbs)
    r["launch_us"] = args.launch_us
    tot = {k: sum(p[k] for p in r["parts"].values()) for k in ("flops", "bytes", "ops", "time_s")}
    b = args.batch
    print(f"\n{args.preset} {r['h']}x{r['w']} batch {b} T={r['text_len']} bf16, forward + loss + backward; "
          f"peak {args.peak_tflops} TFLOP/s, {args.hbm_tbs} TB/s")
    print("| part | TFLOP/img | GB/img | FLOP/byte | ops | roofline ms/img | bound | share |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for name, p in r["parts"].items():
        ai = p["flops"] / p["bytes"] if p["bytes"] else 0
        bound = "compute" if p["compute_s"] > p["memory_s"] else "memory"
        print(f"| {name} | {p['flops'] / b / 1e12:.2f} | {p['bytes'] / b / 1e9:.1f} | {ai:.0f} | {p['ops']} | "
              f"{1e3 * p['time_s'] / b:.1f} | {bound} | {100 * p['time_s'] / tot['time_s']:.0f} % |")
    launch = tot["ops"] * args.launch_us * 1e-6
    mfu = tot["flops"] / (args.peak_tflops * 1e12) / tot["time_s"]
    mfu_l = tot["flops"] / (args.peak_tflops * 1e12) / (tot["time_s"] + launch)
    print(f"| total | {tot['flops'] / b / 1e12:.2f} | {tot['bytes'] / b / 1e9:.1f} | "
          f"{tot['flops'] / tot['bytes']:.0f} | {tot['ops']} | {1e3 * tot['time_s'] / b:.1f} | | 100 % |")
    print(f"\nroofline step {1e3 * tot['time_s']:.1f} ms ({b / tot['time_s']:.1f} img/s, MFU {100 * mfu:.0f} %); "
          f"+ {tot['ops']} launches x {args.launch_us} µs = {1e3 * launch:.0f} ms if nothing overlaps "
          f"(MFU {100 * mfu_l:.0f} %). trace {r['trace_s']:.0f} s")
    r.update(total=tot, launch_s=launch, mfu_roofline=mfu, mfu_with_launch=mfu_l)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
