"""Graph breaks of one training step (model forward + loss, train mode) under TorchDynamo (issue 22).

``torch._dynamo.explain`` traces the step once and reports every graph break with its reason and source line; no
backend compiles anything, so this runs where Inductor would take many minutes (CPU). A break is where a
data-dependent shape or a host sync (``nonzero``, boolean-mask indexing, ``.item()``, a Python ``if`` on a tensor)
stops the graph. The batch: image 0 with two boxes, image 1 with none (different content sizes).

  python benchmarks/explain_step.py --preset tiny --size 64x96 --batch 2
  python benchmarks/explain_step.py --preset glip_t --size 256 --batch 1
  python benchmarks/explain_step.py --preset tiny --backend aot_eager     # also compile it: loss vs eager, times

Prints the counts and reasons and writes json (default benchmarks/results/explain_step-<preset>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def _size(s: str) -> tuple:
    h, _, w = s.partition("x")
    return int(h), int(w or h)


def make_batch(model, h: int, w: int, batch: int):
    from glip_pl.model import make_targets
    from glip_pl.model.prompts import build_detection_prompt, spans_to_token_map

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, h, w), generator=g, dtype=torch.uint8)
    sizes = torch.tensor([[h - 16 * (i % 2), w - 8 * (i % 2)] for i in range(batch)])
    prompt = build_detection_prompt(["red circle", "blue square", "green triangle"])
    text, offsets = model.tokenize([prompt.caption] * batch)
    tmap = spans_to_token_map(prompt.caption, prompt.spans, offsets[0], text.length)
    two = torch.tensor([[0.06 * w, 0.1 * h, 0.6 * w, 0.8 * h], [0.45 * w, 0.3 * h, 0.95 * w, 0.9 * h]])
    boxes = [two if i % 2 == 0 else torch.zeros(0, 4) for i in range(batch)]
    maps = [tmap[[0, 1]] if i % 2 == 0 else tmap[[]] for i in range(batch)]
    return images, sizes, text, make_targets(boxes, maps, text.length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=_size, default=(64, 96), help="H or HxW")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--backend", default=None, help="also torch.compile the step with this backend")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from glip_pl.model import build_glip

    torch.manual_seed(0)
    model = build_glip(args.preset).train()
    batch = make_batch(model, *args.size, args.batch)

    def step(images, sizes, text, targets):
        return model.criterion.total(model.loss(model(images, sizes, text), targets))

    torch._dynamo.reset()
    t0 = time.perf_counter()
    ex = torch._dynamo.explain(step)(*batch)
    explain_s = time.perf_counter() - t0
    breaks = []
    for b in ex.break_reasons:
        frame = b.user_stack[-1] if b.user_stack else None
        where = f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"
        breaks.append(f"{where}: {b.reason.splitlines()[0]}")
    res = {"preset": args.preset, "size": list(args.size), "batch": args.batch, "torch": torch.__version__,
           "graphs": ex.graph_count, "graph_breaks": ex.graph_break_count, "ops": ex.op_count,
           "break_reasons": breaks, "explain_s": round(explain_s, 1)}
    print(f"{args.preset} {args.size} batch {args.batch}: {ex.graph_count} graph(s), {ex.graph_break_count} "
          f"break(s), {ex.op_count} ops; explain {explain_s:.1f} s")
    for line in breaks:
        print("  break at", line)

    if args.backend:
        torch.manual_seed(1)
        eager = step(*batch).detach()
        compiled = torch.compile(step, backend=args.backend)
        torch.manual_seed(1)
        t0 = time.perf_counter()
        loss = compiled(*batch)
        loss.backward()
        res["compile_first_step_s"] = round(time.perf_counter() - t0, 1)
        res["loss_eager"], res["loss_compiled"] = float(eager), float(loss.detach())
        print(f"{args.backend}: first step (compile + forward + backward) {res['compile_first_step_s']} s; loss "
              f"eager {res['loss_eager']:.6f} compiled {res['loss_compiled']:.6f}")

    out = Path(args.out or f"benchmarks/results/explain_step-{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
