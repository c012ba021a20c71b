"""``glip-pl odinw``: the command line of ``glip_pl.eval.odinw`` (box AP over a folder of ODinW-style sets)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import odinw


def register(subparsers) -> None:
    p = subparsers.add_parser("odinw", help="zero-shot or fine-tuned AP over a folder of ODinW-style COCO sets",
                              description=odinw.__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder of sets: <set>[/<variant>]/{train,valid,test}/<json>")
    p.add_argument("--ckpt", required=True, help="checkpoint to evaluate (or to start each fine-tune from)")
    p.add_argument("--split", default=odinw.OFFICIAL,
                   help="split to score: official (default: mini_val where present, else valid/val), valid, "
                        "minival, test, train, or a folder name")
    p.add_argument("--sets", default=None, help="comma-separated set names (as listed) to run; default all")
    p.add_argument("--finetune", action="append", metavar="RECIPE", default=None,
                   help="fine-tune each set first with this recipe (repeat for several --config files, in order)")
    p.add_argument("--fit-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for glip-pl fit, e.g. --fit-arg=--trainer.devices=1 (repeatable)")
    p.add_argument("--work-dir", default="runs/odinw", help="shards and fine-tuning runs, one folder per set")
    p.add_argument("--out", default=None, help="write the results json here")
    p.add_argument("--device", default="cpu", help="torch device for evaluation (default cpu)")
    p.add_argument("--min-size", type=int, default=800, help="shorter image side at evaluation (default 800)")
    p.add_argument("--max-size", type=int, default=1333, help="longer side limit at evaluation (default 1333)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..model.types import GLIPInputError

    sets = [s.strip() for s in args.sets.split(",") if s.strip()] if args.sets else None
    try:
        res = odinw.run_odinw(args.root, args.ckpt, split=args.split, sets=sets, finetune=args.finetune,
                        work_dir=args.work_dir, fit_args=args.fit_arg,
                        predictor_kw={"device": args.device, "min_size": args.min_size, "max_size": args.max_size})
    except (odinw.OdinwError, GLIPInputError) as e:
        print(f"glip-pl odinw: error: {e}", file=sys.stderr)
        return 2
    print(odinw.format_results(res))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"results written to {out}")
    return 1 if res["failed"] else 0
