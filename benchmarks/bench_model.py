"""Training-step benchmark of the GLIP model: forward + backward (+ AdamW step) time and peak memory.

Compares variants in one run (ratios are what count on shared machines):
  text padded to 256 (official) vs. to the batch's longest prompt; plain attention vs. SDPA.
Each variant runs in its own subprocess so peak memory (CUDA allocator on GPU, max RSS on CPU) is per variant.

  python benchmarks/bench_model.py --preset tiny --size 256 --batch 2 --prompt-tokens 24
  python benchmarks/bench_model.py --preset glip_t --size 800x1333 --batch 2 --device cuda --dtype bf16

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

VARIANTS = {
    "official: pad 256 + plain attention": dict(pad256=True, use_sdpa=False),
    "pad 256 + SDPA": dict(pad256=True, use_sdpa=True),
    "longest prompt + plain attention": dict(pad256=False, use_sdpa=False),
    "glip_pl: longest prompt + SDPA": dict(pad256=False, use_sdpa=True),
}


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except Exception:
        return "unknown"


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
    model = build_glip(args.preset, use_sdpa=args.use_sdpa, dropblock=False).to(dev).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
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

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(images, sizes, text)
        loss = model.criterion.total(model.loss(out, targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
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
    return {"step_s": dt, "images_per_s": args.batch / dt, "peak_mib": peak, "text_len": int(text.length)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", default="256", help="H or HxW of the input")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=24, help="approximate prompt length in tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    hw = args.size.lower().split("x")
    args.h, args.w = int(hw[0]), int(hw[-1])
    if args.child:
        for k, v in VARIANTS[args.child].items():
            setattr(args, k, v)
        print(json.dumps(run_variant(args)))
        return 0

    rows = []
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--child", name] + [a for a in (argv or sys.argv[1:])]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            rows.append({"variant": name, "error": r.stderr.strip().splitlines()[-1] if r.stderr else "failed"})
            continue
        rows.append({"variant": name, **json.loads(r.stdout.strip().splitlines()[-1])})
    base = next((r for r in rows if "step_s" in r), None)
    print(f"\npreset={args.preset} input={args.h}x{args.w} batch={args.batch} prompt~{args.prompt_tokens} tokens "
          f"device={args.device} dtype={args.dtype} commit={git_commit()}")
    print(f"{'variant':40s} {'text T':>6s} {'step s':>8s} {'img/s':>7s} {'peak MiB':>9s} {'speed-up':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:40s} ERROR {r['error']}")
            continue
        print(f"{r['variant']:40s} {r['text_len']:6d} {r['step_s']:8.3f} {r['images_per_s']:7.2f} "
              f"{r['peak_mib']:9.0f} {base['step_s'] / r['step_s']:7.2f}x")
    out = Path(args.out or f"benchmarks/results/bench_model-{args.preset}-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/bench_model.py " + " ".join(argv or sys.argv[1:]),
            "commit": git_commit(), "device": args.device, "host": platform.node(), "rows": rows}
    out.write_text(json.dumps(meta, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
