"""Memory plan without a GPU: peak GPU memory of one GLIP training step (forward + loss + backward + AdamW) for
glip_t / glip_l at the paper's input sizes, batch 1-4, bf16, with and without activation checkpointing, and under
DDP / DeepSpeed ZeRO-2 / FSDP2 on 8 GPUs; the largest batch that fits 40 / 80 / 141 GB cards.

How it is measured. The model is built on the meta device (no memory, no init arithmetic), its parameters and
buffers are swapped for fake tensors on device "cpu" (``FakeTensorMode``: shapes only), and one step runs under
``torch.distributed._tools.mem_tracker.MemTracker``, which records every storage allocated and freed, so the peak is
that of the step's own allocations (what ``torch.cuda.max_memory_allocated`` reports, less allocator rounding).
Two workarounds (../shared/reference/environment.md): building inside FakeTensorMode trips timm's init, hence meta
+ swap; fake ``nonzero`` has no size, so it is given its upper bound (every element true: exact for the loss's
token mask, an over-count of a few MB for the positive anchors). The model runs its CUDA paths where they differ
in memory: torchvision's deformable-conv kernel (``deform_conv="torchvision"``, not the CPU grid_sample form) and
SDPA. MemTracker's per-module statistics cost O(modules) per op; only the global peak is kept (``_PeakTracker``).

How bf16 is modelled. CPU autocast casts a different op list than CUDA autocast, so a CPU-autocast trace is not a
GPU figure. Instead the activations are measured on the model cast to bf16 (parameters, inputs and activations
bf16; the loss is fp32 as in training because the criterion disables autocast) and, separately, in fp32. The bf16
trace is what a GPU stores when the compute runs in bf16 throughout (DeepSpeed's bf16 mode and FSDP's bf16
``param_dtype`` do exactly that); CUDA autocast (DDP ``bf16-mixed``) keeps norm / softmax outputs in fp32 and
saves some inputs twice, so its activations lie between the two traces: the plan's "bf16" figures use the bf16
trace, the fp32 trace is reported as the upper bound. Model state is always counted as bf16-mixed keeps it:
fp32 parameters, fp32 gradients, fp32 AdamW moments.

Strategies (8 GPUs; n parameters; A = activations and temporaries at the single-replica peak, bf16 trace):
  1 GPU   4n params + 8n AdamW + the gradients alive at the peak (fp32) + A       (what the GPU suite measures)
  DDP     4n + 8n + 4n gradients + 4n DDP's flat gradient buckets (gradient_as_bucket_view off) + A
  ZeRO-2  2n bf16 params + 2n bf16 gradients (before their bucket is reduced) + (4n fp32 master + 4n fp32
          gradient partition + 8n AdamW) / 8 + reduce and all-gather buckets (recipe: 2e8 elements each, bf16) + A
  FSDP2   (4n + 4n + 8n) / 8 sharded + parameters outside any FSDP unit gathered for the step (bf16) + two units
          unsharded at a time (current + prefetched: bf16 params + fp32 gradients before reduce-scatter) + A
A card "fits" when 1.10 x predicted + 1.5 GiB <= its capacity: 10 % for the caching allocator's fragmentation,
1.5 GiB for the CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers (assumed, not measured here).

    python benchmarks/memory_plan.py        # the plan: glip_t + glip_l traced at 800x1333, batch 1 and 2, 3 checkpointing
                                            # modes (12 traces, 2-9 min each on one loaded core); 1024 / 1600 scaled
    python benchmarks/memory_plan.py --tables-from benchmarks/results/memory_plan-*.json   # tables of saved runs
    python benchmarks/memory_plan.py --presets glip_t --long-sides 1333 --batches 2 --checkpointing none
    python benchmarks/memory_plan.py --presets tiny --long-sides 256 --batches 2 --real   # fake vs real check

Prints markdown tables and writes json (default benchmarks/results/memory_plan.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import git_commit  # noqa: E402

GIB = 2**30
CHECKPOINTING = {
    "none": {},
    "fusion": dict(checkpoint_fusion=True),  # what recipes/pretrain/*.yaml set (official DYHEAD.USE_CHECKPOINT)
    "all": dict(checkpoint_backbone=True, checkpoint_text=True, checkpoint_fusion=True, checkpoint_dyhead=True),
}
# capacity as torch.cuda reports it (GiB): A100-40GB, H100-80GB SXM, H200
CARDS = {"40 GB": 39.4, "80 GB": 79.1, "141 GB": 139.8}
RESERVE_GIB, FRAGMENTATION = 1.5, 1.10
STRATEGIES = ("1 GPU", "DDP", "ZeRO-2", "FSDP2")
WORLD = 8
DS_BUCKET_ELEMENTS = 2e8  # recipes/cluster/deepspeed_zero2.yaml: reduce_bucket_size = allgather_bucket_size


class _PeakTracker(MemTracker):
    """MemTracker keeping only the global peak: its per-module peak bookkeeping walks every module on every op,
    which made a glip_t step take tens of minutes on fake tensors."""

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)

    def skip_frozen(self, model) -> None:
        """MemTracker hooks every parameter's gradient, which fails on frozen ones (glip_l freezes its stem)."""
        for p in model.parameters():
            if not p.requires_grad:
                self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())


class _NoHook:
    def remove(self) -> None:
        pass


def _nonzero_upper_bound(fake_mode, func, arg):
    # a fake nonzero needs a size: take the most it can return (all elements true)
    n = arg.numel()
    return arg.new_empty_strided((n, arg.dim()), (1, n), dtype=torch.int64)


def input_size(long_side: int, short_ratio: float = 0.6) -> tuple:
    """(H, W) of a landscape training image with this long side, padded to 32 as the model does."""
    h = round(long_side * short_ratio)
    return -(-h // 32) * 32, -(-long_side // 32) * 32


def build_meta(preset: str, checkpointing: str, real: bool = False, **overrides):
    from glip_pl.model import build_glip

    opts = dict(dropblock=False, deform_conv="torchvision", **CHECKPOINTING[checkpointing], **overrides)
    if real:
        torch.manual_seed(0)
        return build_glip(preset, **opts).train()
    with torch.device("meta"):
        return build_glip(preset, **opts).train()


def synthetic_batch(model, batch: int, h: int, w: int, text_len: int, device="cpu"):
    from glip_pl.model import make_targets
    from glip_pl.model.prompts import build_detection_prompt, spans_to_token_map

    names = [f"object {k}" for k in range(max(1, (text_len - 2) // 3))]
    prompt = build_detection_prompt(names)
    text, offsets = model.tokenize([prompt.caption] * batch)
    tmap = spans_to_token_map(prompt.caption, prompt.spans, offsets[0], text.length)
    g = torch.Generator().manual_seed(0)
    boxes, pos = [], []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 24 + torch.rand(4, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        boxes.append(torch.cat([xy, xy + wh], 1))
        pos.append(tmap[torch.randint(0, len(names), (4,), generator=g)])
    images = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8)
    sizes = torch.tensor([[h, w]] * batch)
    return images, sizes, text, make_targets(boxes, pos, text.length)


def _bf16_inputs(model) -> None:
    """A bf16 model gets bf16 pixels: ``GLIP.normalize`` returns fp32 (on a GPU, DeepSpeed's bf16 mode fails there,
    ../shared/reference/environment.md), so this script casts its output for the measurement only."""
    from glip_pl.model.glip import GLIP

    model.normalize = lambda images, sizes: GLIP.normalize(model, images, sizes).to(torch.bfloat16)


def make_fake(model):
    """Swap a meta model's parameters and buffers for fake tensors on device "cpu"; returns the FakeTensorMode."""
    from torch._subclasses import fake_impls
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    fake_impls.op_implementations_dict[torch.ops.aten.nonzero.default] = _nonzero_upper_bound
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    model._apply(lambda t: FakeTensor(mode, t, torch.device("cpu")) if t.device.type == "meta" else t)
    return mode


def trace_step(preset: str, h: int, w: int, batch: int, text_len: int, checkpointing: str, dtype: str,
               real: bool = False, model=None) -> dict:
    """Peak memory (bytes, by kind) of one training step; ``real`` runs real tensors on CPU (the check)."""
    model = model if model is not None else build_meta(preset, checkpointing, real)
    if dtype == "bf16":
        model.to(torch.bfloat16)  # before the fake swap: fake parameters cannot be swapped again
        _bf16_inputs(model)
    mode = None if real else make_fake(model)
    n_params = sum(p.numel() for p in model.parameters())
    images, sizes, text, targets = synthetic_batch(model, batch, h, w, text_len)
    t0 = time.perf_counter()
    ctx = mode if mode is not None else contextlib.nullcontext()
    with ctx:
        params = [p for p in model.parameters() if p.requires_grad]
        # foreach: the default AdamW implementation on CUDA (its temporaries count); moments created up front, as
        # in every step after the first
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tracker = _PeakTracker()
        tracker.skip_frozen(model)
        tracker.track_external(model, opt)
        with tracker:
            out = model(images, sizes, text)
            loss = model.criterion.total(model.loss(out, targets))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    kinds = {k.name.lower(): int(snap.get(k, 0)) for k in _MemRefType}
    return {"preset": preset, "h": h, "w": w, "batch": batch, "text_len": int(text.length),
            "checkpointing": checkpointing, "dtype": dtype, "real": real, "n_params": int(n_params),
            "peak": int(snap[_TOTAL_KEY]), **kinds, "trace_s": time.perf_counter() - t0}


def model_state(preset: str) -> dict:
    """Parameter counts the sharded strategies need: total, outside any FSDP unit, largest unit."""
    from glip_pl.lit.strategies import glip_block_classes

    model = build_meta(preset, "none")
    blocks = tuple(glip_block_classes())
    in_unit, largest = set(), 0
    for m in model.modules():
        if isinstance(m, blocks):
            ps = list(m.parameters())
            if not any(id(p) in in_unit for p in ps):  # outermost unit only
                largest = max(largest, sum(p.numel() for p in ps))
            in_unit.update(id(p) for p in ps)
    total = sum(p.numel() for p in model.parameters())
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_unit)
    return {"n": int(total), "n_root": int(root), "n_unit_max": int(largest)}


def predict(trace: dict, state: dict) -> dict:
    """Peak bytes per GPU for each strategy from one single-replica trace (see the module docstring)."""
    n, esize = state["n"], 2 if trace["dtype"] == "bf16" else 4
    act = trace["act"] + trace["temp"] + trace["oth"]
    grad_alive = trace["grad"] / esize * 4  # the trace's gradients are in its dtype; bf16-mixed keeps fp32
    bucket = 2 * DS_BUCKET_ELEMENTS * 2
    return {
        "1 GPU": 4 * n + 8 * n + grad_alive + trace["buffer"] / esize * 4 + act,
        "DDP": 4 * n + 8 * n + 4 * n + 4 * n + act,
        "ZeRO-2": 2 * n + 2 * n + (4 * n + 4 * n + 8 * n) / WORLD + bucket + act,
        "FSDP2": (4 * n + 4 * n + 8 * n) / WORLD + 2 * state["n_root"] + 2 * state["n_unit_max"] * (2 + 4) + act,
    }


def extrapolate(rows: list, batches: list) -> list:
    """Rows for untraced batches, linear in the batch from the two smallest traced ones of each group (activations
    and gradients alive at the peak grow with the batch; model state does not)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["preset"], r["h"], r["w"], r["checkpointing"], r["dtype"], r["real"]), []).append(r)
    out = []
    for rs in groups.values():
        rs = sorted(rs, key=lambda r: r["batch"])
        traced = {r["batch"] for r in rs}
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[1]
        for n in sorted(set(batches) - traced):
            e = dict(a, batch=n, extrapolated=True, trace_s=0.0)
            for k in ("act", "temp", "oth", "grad"):
                e[k] = int(a[k] + (b[k] - a[k]) * (n - a["batch"]) / (b["batch"] - a["batch"]))
            e["peak"] = sum(e[k.name.lower()] for k in _MemRefType)
            out.append(e)
    return out


def scale_sizes(rows: list, long_sides: list) -> list:
    """Rows for untraced input sizes: activations (and temporaries) scaled by the pixel count from the traced
    size of the same preset / checkpointing / dtype / batch; model state and live gradients unchanged."""
    out = []
    traced = {(r["preset"], r["checkpointing"], r["dtype"], r["batch"], r["w"]) for r in rows}
    for r in rows:
        if r.get("scaled") or r["real"]:
            continue
        for ls in long_sides:
            h, w = input_size(ls)
            if (r["preset"], r["checkpointing"], r["dtype"], r["batch"], w) in traced:
                continue
            f = h * w / (r["h"] * r["w"])
            e = dict(r, h=h, w=w, scaled=True, trace_s=0.0, **{k: int(r[k] * f) for k in ("act", "temp", "oth")})
            e["peak"] = sum(e[k.name.lower()] for k in _MemRefType)
            out.append(e)
            traced.add((r["preset"], r["checkpointing"], r["dtype"], r["batch"], w))
    return out


def fits(pred_bytes: float, card_gib: float) -> bool:
    return FRAGMENTATION * pred_bytes / GIB + RESERVE_GIB <= card_gib


def max_batch(p1: float, p2: float, card_gib: float, limit: int = 64) -> int:
    """Largest batch whose predicted peak fits the card, linear in the batch through the batch-1 and -2 figures."""
    if not fits(p1, card_gib):
        return 0
    room = ((card_gib - RESERVE_GIB) / FRAGMENTATION) * GIB
    slope = p2 - p1
    return limit if slope <= 0 else min(limit, int((room - (p1 - slope)) // slope))


def largest_batch_table(rows: list, dtype: str) -> str:
    """Markdown: per preset / input / checkpointing, the 1-GPU peak at batch 1 and 2 and, per strategy, the largest
    batch that fits a 40 / 80 / 141 GB card."""
    keyed = {}
    for r in rows:
        if r["dtype"] == dtype and "pred" in r and r["batch"] in (1, 2) and not r["real"]:
            keyed.setdefault((r["preset"], r["w"], r["checkpointing"]), {})[r["batch"]] = r
    cards = " / ".join(CARDS)
    lines = [f"| preset | input | checkpointing | 1 GPU peak GiB, batch 1 / 2 | "
             + " | ".join(f"{s}: max batch {cards}" for s in STRATEGIES) + " |",
             "|---|---|---|---:|" + "---:|" * len(STRATEGIES)]
    order = {c: i for i, c in enumerate(CHECKPOINTING)}
    for (preset, w, ck), rs in sorted(keyed.items(), key=lambda kv: (kv[0][0], kv[0][1], order[kv[0][2]])):
        r1, r2 = rs.get(1), rs.get(2)
        if r1 is None:
            continue
        peak = f"{r1['pred']['1 GPU'] / GIB:.1f} / " + (f"{r2['pred']['1 GPU'] / GIB:.1f}" if r2 else "–")
        cells = []
        for s in STRATEGIES:
            if r2 is None:
                cells.append(" / ".join(("≥1" if fits(r1["pred"][s], c) else "0") for c in CARDS.values()))
            else:
                cells.append(" / ".join(str(max_batch(r1["pred"][s], r2["pred"][s], c)) for c in CARDS.values()))
        lines.append(f"| {preset} | {r1['h']}×{w} | {ck} | {peak} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["glip_t", "glip_l"])
    ap.add_argument("--long-sides", type=int, nargs="+", default=[1333], help="traced input sizes (long side)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="traced batches")
    ap.add_argument("--checkpointing", nargs="+", default=list(CHECKPOINTING), choices=list(CHECKPOINTING))
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp32"])
    ap.add_argument("--text-len", type=int, default=256, help="prompt tokens (256: the longest a batch can hold)")
    ap.add_argument("--extrapolate", type=int, nargs="*", default=[3, 4],
                    help="batches predicted linearly from the two smallest traced ones (not traced)")
    ap.add_argument("--scale-to", type=int, nargs="*", default=[1024, 1600],
                    help="long sides predicted from the traced size by pixel count (not traced)")
    ap.add_argument("--tables-from", nargs="+", default=None, help="only print the tables of these json files")
    ap.add_argument("--real", action="store_true", help="also run each trace on real CPU tensors (small presets)")
    ap.add_argument("--out", default="benchmarks/results/memory_plan.json")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])

    rows, states = [], {}
    if args.tables_from:
        for f in args.tables_from:
            d = json.loads(Path(f).read_text())
            rows += [r for r in d["rows"] if not (r.get("extrapolated") or r.get("scaled"))]
            states.update(d["states"])
        args.dtypes = sorted({r["dtype"] for r in rows})
        args.text_len = rows[0]["text_len"] if rows else args.text_len
    for preset in ([] if args.tables_from else args.presets):
        states[preset] = model_state(preset)
        for long_side in args.long_sides:
            h, w = input_size(long_side)
            for ck in args.checkpointing:
                for dtype in args.dtypes:
                    for b in args.batches:
                        for real in ([False, True] if args.real else [False]):
                            r = trace_step(preset, h, w, b, args.text_len, ck, dtype, real=real)
                            r["pred"] = predict(r, states[preset])
                            rows.append(r)
                            save(args, rows, states)  # after every trace: a long plan keeps what it measured
                            print(f"  {preset} {h}x{w} b{b} ckpt={ck} {dtype}{' real' if real else ''}: peak "
                                  f"{r['peak'] / GIB:.2f} GiB (act {r['act'] / GIB:.2f}), 1 GPU "
                                  f"{r['pred']['1 GPU'] / GIB:.2f} GiB, {r['trace_s']:.0f} s",
                                  file=sys.stderr, flush=True)
    for e in extrapolate(rows, args.extrapolate):
        e["pred"] = predict(e, states[e["preset"]])
        rows.append(e)
    for e in scale_sizes(rows, args.scale_to):
        e["pred"] = predict(e, states[e["preset"]])
        rows.append(e)
    print(f"\nmemory plan: text {args.text_len} tokens, commit {git_commit()}, "
          f"fits = {FRAGMENTATION:.2f} x peak + {RESERVE_GIB} GiB <= card\n")
    for dtype in args.dtypes:
        print(f"### {dtype} activations ({'model cast to bf16' if dtype == 'bf16' else 'fp32: the upper bound'})\n")
        print(largest_batch_table(rows, dtype) + "\n")
    if args.tables_from:
        return 0
    print(f"wrote {save(args, rows, states)}")
    return 0


def save(args, rows: list, states: dict) -> Path:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/memory_plan.py " + " ".join(args.argv),
                               "commit": git_commit(), "cards_gib": CARDS, "reserve_gib": RESERVE_GIB,
                               "fragmentation": FRAGMENTATION, "world": WORLD, "states": states, "rows": rows},
                              indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main())
