"""Time of the grounding criterion alone (ATSS + losses, forward + backward) at a paper-size anchor grid.

Random head outputs for an 800x1333 input (P3-P7: ~22k anchors), B images with M boxes each (image 1 without boxes),
T tokens. ``--losses-file`` times another version of ``glip_pl/model/losses.py`` in the same run, e.g. the one
before the fixed-shape rewrite (issue 22):

  git show 035ed94^:src/glip_pl/model/losses.py > /tmp/losses_old.py
  python benchmarks/bench_loss.py --losses-file /tmp/losses_old.py

Prints median times and the loss terms of each version (they must agree).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch


def _load(path: str):
    spec = importlib.util.spec_from_file_location("glip_pl.model._losses_other", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_case(B: int, M: int, T: int, h: int, w: int, seed: int = 0):
    from glip_pl.model.anchors import make_anchors
    from glip_pl.model.types import GroundingOutputs, Targets

    g = torch.Generator().manual_seed(seed)
    sizes = [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64, 128)]
    anchors = make_anchors(sizes)
    N = anchors.shape[0]
    xy = torch.rand(B, M, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = torch.rand(B, M, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 8
    valid = torch.ones(B, M, dtype=torch.bool)
    valid[1:2] = False  # an image without boxes
    targets = Targets(boxes=torch.cat([xy, xy + wh], -1), valid=valid,
                      positive_map=(torch.rand(B, M, T, generator=g) > 0.8).float())
    mask = torch.arange(T)[None] < torch.tensor([T] + [T - 5] * (B - 1))[:, None]

    def outputs():
        g2 = torch.Generator().manual_seed(seed + 1)
        return GroundingOutputs(
            logits=(torch.randn(B, N, T, generator=g2) * 2).requires_grad_(),
            box_regression=(torch.randn(B, N, 4, generator=g2) * 0.3).requires_grad_(),
            centerness=torch.randn(B, N, generator=g2).requires_grad_(),
            anchors=anchors, level_sizes=sizes, text_mask=mask)

    return outputs, targets, N


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--boxes", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--size", default="800x1333")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--losses-file", default=None, help="another losses.py to time in the same run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from glip_pl.model import losses as current
    from glip_pl.model.box_coder import BoxCoder

    h, _, w = args.size.partition("x")
    outputs, targets, N = make_case(args.batch, args.boxes, args.tokens, int(h), int(w or h))
    versions = {"this tree": current}
    if args.losses_file:
        versions[args.losses_file] = _load(args.losses_file)
    times = {k: [] for k in versions}
    terms = {}
    for _ in range(args.repeats):  # interleaved, so load on a shared machine hits both alike
        for name, mod in versions.items():
            crit = mod.GroundingCriterion(BoxCoder())
            out = outputs()
            t0 = time.perf_counter()
            got = crit(out, targets)
            crit.total(got).backward()
            times[name].append(time.perf_counter() - t0)
            terms[name] = {k: round(float(v.detach()), 6) for k, v in got.items()}
    print(f"criterion forward + backward, B={args.batch} N={N} T={args.tokens} M={args.boxes}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    for name in versions:
        print(f"  {name}: {statistics.median(times[name]) * 1e3:.1f} ms  {terms[name]}")


if __name__ == "__main__":
    main()
