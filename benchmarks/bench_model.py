"""Training-step benchmark of the GLIP model: forward + backward (+ AdamW step) time, peak memory, FLOPs and MFU.

Compares variants in one run (ratios are what count on shared machines):
  text padded to 256 (official) vs. to the batch's longest prompt; plain attention vs. SDPA; the per-image ATSS +
  loss loop (official style) vs. the vectorised one; with activation checkpointing (every part); with
  ``torch.compile`` of the fusion head; torchvision's deformable conv kernel vs. the grid_sample form that the model
  uses off CUDA; fp32 vs. bf16 autocast (``--dtype``, GPU).
Each variant runs in its own subprocess so peak memory (CUDA allocator on GPU, max RSS on CPU) is per variant.

FLOPs are counted once per text length with ``torch.utils.flop_counter`` on the plain-attention model (forward +
backward of one step; modulated deformable convolutions counted as the dense 3x3 convolution they replace; CPU
SDPA kernels are invisible to the counter, hence the plain model). "Model TFLOP/s" divides the FLOPs of the
longest-prompt model (the work the step needs) by the step time, so padding and recomputation count as waste; MFU
is that against the device's peak (``--peak-tflops``, or known for A100/H100/H200).

  python benchmarks/bench_model.py --preset tiny --size 256 --batch 2 --prompt-tokens 24
  python benchmarks/bench_model.py --preset glip_t --size 800x1333 --batch 2 --device cuda --dtype bf16
  python benchmarks/bench_model.py --variants 0 3 4      # a subset (indices into the table)

Prints a table and writes json (default benchmarks/results/bench_model-<preset>-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench_common import git_commit

GLIP_PL = dict(pad256=False, use_sdpa=True)
VARIANTS = {
    "official: pad 256 + plain attention": dict(pad256=True, use_sdpa=False),
    "pad 256 + SDPA": dict(pad256=True, use_sdpa=True),
    "longest prompt + plain attention": dict(pad256=False, use_sdpa=False),
    "glip_pl: longest prompt + SDPA": GLIP_PL,
    "glip_pl, per-image ATSS + loss loop": dict(GLIP_PL, loss_loop=True),
    "glip_pl + activation checkpointing": dict(GLIP_PL, checkpointing=True),
    "glip_pl + torch.compile(head)": dict(GLIP_PL, compile=True),
    "glip_pl, torchvision deform_conv2d kernel": dict(GLIP_PL, deform_conv="torchvision"),
}
# deform_conv "auto": torchvision's kernel on CUDA, the grid_sample form elsewhere (model/dyhead.py)
DEFAULTS = dict(pad256=False, use_sdpa=True, loss_loop=False, checkpointing=False, compile=False, deform_conv="auto")

# dense peak TFLOP/s (no sparsity) by device name fragment and autocast dtype
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp32": 494.7},  # fp32 = TF32 tensor cores
    "H100": {"bf16": 989.4, "fp32": 494.7},  # SXM
    "A100": {"bf16": 312.0, "fp32": 156.0},
}


def device_peak_tflops(device: str, dtype: str):
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v[dtype] for k, v in PEAK_TFLOPS.items() if k in name), None)


def count_step_flops(model, step) -> int:
    """FLOPs of one training step (forward + backward), modulated deformable convolutions included."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def deform(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        b, cout, ho, wo = out_shape
        return 2 * b * cout * ho * wo * weight_shape[1] * weight_shape[2] * weight_shape[3]

    def deform_backward(grad_shape, input_shape, weight_shape, *args, **kwargs) -> int:
        b, cout, ho, wo = grad_shape
        return 2 * 2 * b * cout * ho * wo * weight_shape[1] * weight_shape[2] * weight_shape[3]  # d input + d weight

    mapping = {}
    tv = getattr(torch.ops, "torchvision", None)
    if tv is not None and hasattr(tv, "deform_conv2d"):
        mapping[tv.deform_conv2d] = deform
        mapping[tv._deform_conv2d_backward] = deform_backward
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        step()
    return int(counter.get_total_flops())


def run_variant(args) -> dict:
    """Child process: build the model, time `steps` training steps after `warmup`."""
    import resource

    import torch

    from glip_pl.model import build_glip, make_targets
    from glip_pl.model.prompts import build_detection_prompt, spans_to_token_map

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    ckpt = dict(checkpoint_backbone=True, checkpoint_text=True, checkpoint_fusion=True, checkpoint_dyhead=True)
    model = build_glip(args.preset, use_sdpa=args.use_sdpa, dropblock=False, deform_conv=args.deform_conv,
                       **(ckpt if args.checkpointing else {})).to(dev).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if args.compile:
        model.head.compile(dynamic=False)
    h, w = args.h, args.w
    images = torch.randint(0, 256, (args.batch, 3, h, w), dtype=torch.uint8, device=dev)
    sizes = torch.tensor([[h, w]] * args.batch, device=dev)
    # a prompt of about `prompt_tokens` tokens: class names "object k"
    names = [f"object {k}" for k in range(max(1, (args.prompt_tokens - 2) // 3))]
    prompt = build_detection_prompt(names)
    text, offsets = model.tokenize([prompt.caption] * args.batch, pad_to=256 if args.pad256 else None)
    tmap = spans_to_token_map(prompt.caption, prompt.spans, offsets[0], text.length)
    g = torch.Generator().manual_seed(0)
    boxes, pos = [], []
    for _ in range(args.batch):
        xy = torch.rand(4, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 24 + torch.rand(4, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        boxes.append(torch.cat([xy, xy + wh], 1))
        pos.append(tmap[torch.randint(0, len(names), (4,), generator=g)])
    targets = make_targets(boxes, pos, text.length).to(dev)
    text = text.to(dev)
    amp = args.dtype == "bf16"

    from glip_pl.model.losses import criterion_reference

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(images, sizes, text)
        if args.loss_loop:
            loss = model.criterion.total(criterion_reference(model.criterion, out, targets))
        else:
            loss = model.criterion.total(model.loss(out, targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    t_warm = time.perf_counter()
    # same weights, data and targets in every variant: the eval-mode (no dropout) losses must agree
    model.eval()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        out = model(images, sizes, text)
        terms = criterion_reference(model.criterion, out, targets) if args.loss_loop else model.loss(out, targets)
        first_loss = float(model.criterion.total(terms))
    model.train()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t_warm
    # FLOPs of this variant as run (the main process picks the plain-attention count per text length)
    flops = None if (args.compile or args.no_flops) else count_step_flops(model, step)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB (Linux)
    return {"step_s": dt, "images_per_s": args.batch / dt, "peak_mib": peak, "text_len": int(text.length),
            "warmup_s": warmup_s, "first_loss": first_loss, "flops": flops, "pad256": args.pad256, "use_sdpa": args.use_sdpa}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", default="256", help="H or HxW of the input")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=24, help="approximate prompt length in tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (include compilation)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--variants", type=int, nargs="+", default=None,
                   help="indices of the variants to run (default: all): " +
                        "; ".join(f"{i} {n}" for i, n in enumerate(VARIANTS)))
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (known for A100/H100/H200)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra step per variant)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    hw = args.size.lower().split("x")
    args.h, args.w = int(hw[0]), int(hw[-1])
    if args.child:
        for k, v in {**DEFAULTS, **VARIANTS[args.child]}.items():
            setattr(args, k, v)
        print(json.dumps(run_variant(args)))
        return 0

    names = list(VARIANTS)
    chosen = [names[i] for i in args.variants] if args.variants else names
    rows = []
    for name in chosen:
        cmd = [sys.executable, __file__, "--child", name] + [a for a in (argv or sys.argv[1:])]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            rows.append({"variant": name, "error": r.stderr.strip().splitlines()[-1] if r.stderr else "failed"})
            continue
        rows.append({"variant": name, **json.loads(r.stdout.strip().splitlines()[-1])})
        print(f"  {name}: {rows[-1]['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    # model FLOPs per text length, from the plain-attention runs (CPU SDPA kernels are invisible to the counter)
    by_len = {}
    for r in rows:
        if r.get("flops") and not r["use_sdpa"]:
            by_len[r["text_len"]] = r["flops"]
    for r in rows:
        if r.get("flops") and r["text_len"] not in by_len:
            by_len[r["text_len"]] = r["flops"]
    useful = by_len.get(min(by_len)) if by_len else None  # the longest-prompt model: the work the step needs
    peak = args.peak_tflops or device_peak_tflops(args.device, args.dtype)
    for r in rows:
        if "step_s" not in r:
            continue
        r["model_flops"] = by_len.get(r["text_len"])
        r["useful_flops"] = useful
        r["model_tflops_per_s"] = useful / r["step_s"] / 1e12 if useful else None
        r["mfu"] = r["model_tflops_per_s"] / peak if (useful and peak) else None
    base = next((r for r in rows if "step_s" in r), None)
    print(f"\npreset={args.preset} input={args.h}x{args.w} batch={args.batch} prompt~{args.prompt_tokens} tokens "
          f"device={args.device} dtype={args.dtype} commit={git_commit()} peak={peak or '?'} TFLOP/s")
    print(f"{'variant':40s} {'text T':>6s} {'step s':>8s} {'img/s':>7s} {'peak MiB':>9s} {'GFLOP/img':>9s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'speed-up':>8s} {'loss diff':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:40s} ERROR {r['error']}")
            continue
        gf = f"{r['model_flops'] / args.batch / 1e9:9.1f}" if r["model_flops"] else f"{'-':>9s}"
        tf = f"{r['model_tflops_per_s']:8.4f}" if r["model_tflops_per_s"] else f"{'-':>8s}"
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] else f"{'-':>6s}"
        print(f"{r['variant']:40s} {r['text_len']:6d} {r['step_s']:8.3f} {r['images_per_s']:7.2f} "
              f"{r['peak_mib']:9.0f} {gf} {tf} {mfu} {base['step_s'] / r['step_s']:7.2f}x "
              f"{r['first_loss'] - base['first_loss']:9.1e}")
    out = Path(args.out or f"benchmarks/results/bench_model-{args.preset}-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/bench_model.py " + " ".join(argv or sys.argv[1:]),
            "commit": git_commit(), "device": args.device, "host": platform.node(), "peak_tflops": peak,
            "rows": rows}
    out.write_text(json.dumps(meta, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
