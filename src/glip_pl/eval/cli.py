"""``glip-pl evaluate {coco,lvis,flickr}``: score a detections file (ours or another tool's) and write the metrics.

    glip-pl evaluate coco --annotations instances_val2017.json --detections dets.json [--out metrics.json]
    glip-pl evaluate lvis --annotations lvis_v1_minival.json --detections dets.json [--standard]
    glip-pl evaluate flickr --annotations final_flickr_separateGT_test.json --detections preds.json

Detections for coco/lvis are a COCO results list ``[{image_id, category_id, bbox: [x, y, w, h], score}]``; they are
validated first (an unknown id, a NaN score, a negative box size stops with the first bad record named). Flickr
predictions are ``{entry id: [[x1, y1, x2, y2], ...] per phrase, best first}``. Exit codes: 0 ok, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="score a detections file against COCO / LVIS / Flickr30k ground truth",
                              description=__doc__.split("\n\n")[0])
    kinds = p.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    kinds.required = True

    def common(q):
        q.add_argument("--annotations", "-a", required=True, help="ground-truth json")
        q.add_argument("--detections", "-d", required=True, help="detections json")
        q.add_argument("--out", "-o", default=None, help="write the metrics json here")
        q.add_argument("--quiet", action="store_true", help="do not print the table")

    c = kinds.add_parser("coco", help="COCO-style box AP (the 12 standard numbers)")
    common(c)
    c.add_argument("--backend", choices=("faster", "pycocotools"), default="faster",
                   help="faster-coco-eval (default) or the reference pycocotools")
    c.add_argument("--per-class", action="store_true",
                   help="also print (and write) AP / AP50 / AP75 of every category")
    c.set_defaults(func=_run_coco)

    lv = kinds.add_parser("lvis", help="LVIS v1 box AP, APr/APc/APf (Fixed AP by default)")
    common(lv)
    lv.add_argument("--standard", action="store_true", help="standard AP (top 300 per image) instead of Fixed AP")
    lv.add_argument("--topk", type=int, default=10_000, help="Fixed AP: detections kept per category")
    lv.set_defaults(func=_run_lvis)

    f = kinds.add_parser("flickr", help="Flickr30k Entities Recall@1/5/10 and upper bound")
    common(f)
    f.set_defaults(func=_run_flickr)


def _finish(args, metrics: dict, table: str = "") -> int:
    if table and not args.quiet:
        print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        if not args.quiet:
            print(f"metrics written to {out}")
    return 0


def _guard(fn):
    def run(args) -> int:
        from .detections import CocoEvalError, DetectionsFileError

        try:
            return fn(args)
        except (DetectionsFileError, CocoEvalError) as e:
            print(f"glip-pl evaluate: error: {e}", file=sys.stderr)
            return 2

    return run


@_guard
def _run_coco(args) -> int:
    from .coco import evaluate_coco
    from .detections import validate_detections_file

    dets = validate_detections_file(args.detections, args.annotations)
    metrics = evaluate_coco(args.annotations, dets, backend=args.backend, verbose=not args.quiet, validate=False,
                            per_category=args.per_class)
    if args.per_class:
        from .coco import format_per_category

        return _finish(args, metrics, format_per_category(metrics["per_category"]))
    return _finish(args, metrics)


@_guard
def _run_lvis(args) -> int:
    from .detections import validate_detections_file
    from .lvis import evaluate_lvis

    dets = validate_detections_file(args.detections, args.annotations)
    metrics = evaluate_lvis(args.annotations, dets, fixed_ap=not args.standard, topk=args.topk,
                            verbose=not args.quiet, validate=False)
    lines = [f"{k:>5} = {v:0.4f}" for k, v in metrics.items()]
    return _finish(args, metrics, "\n".join(lines))


@_guard
def _run_flickr(args) -> int:
    from .detections import CocoEvalError, load_json
    from .flickr import evaluate_flickr

    preds = load_json(args.detections, "predictions")
    if not isinstance(preds, dict):
        raise CocoEvalError("Flickr predictions: expected {entry id: [[x1, y1, x2, y2], ...] per phrase}")
    try:
        preds = {int(k): v for k, v in preds.items()}
    except ValueError:
        raise CocoEvalError("Flickr predictions: keys must be integer entry ids") from None
    metrics = evaluate_flickr(args.annotations, preds, verbose=not args.quiet)
    return _finish(args, metrics)
