"""``glip-pl pseudo-score``: the command line of ``glip_pl.label.score``."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("pseudo-score", help="precision, recall and box placement of pseudo labels against truth",
                       description="Score a pseudo-label output against true boxes: the records' hidden ones (the "
                                   "synthetic caption split) or --truth grounding shards of the same captions (e.g. "
                                   "people's boxes for a sample). Prints precision / recall at --iou and the true "
                                   "positives' mean IoU, share at IoU >= 0.75, size ratio (1 = no size bias) and "
                                   "centre offset (in true-box sides).")
    p.add_argument("--pseudo", required=True, help="the pseudo-label output folder (or shard list)")
    p.add_argument("--split", default="train", help="split of the pseudo-label output to score (train)")
    p.add_argument("--truth", help="grounding shards with the true boxes of (some of) the same captions, by id")
    p.add_argument("--input", help="the caption shards that were labelled (hidden truth only): the true boxes of "
                                   "captions the job skipped count as missed")
    p.add_argument("--iou", type=float, default=0.5, help="IoU at which a pseudo box matches a true one (0.5)")
    p.add_argument("--any-phrase", action="store_true", help="match boxes whatever phrase they name")
    p.add_argument("--labelled-only", action="store_true", help="do not count unlabelled captions' boxes as missed")
    p.add_argument("--json", help="also write the figures to this file")
    p.set_defaults(func=_main)


def _main(args) -> int:
    import json

    from ..data.schema import ShardError
    from .score import score_pseudo

    if args.truth and args.input:
        raise SystemExit("give --truth or --input, not both (--input only applies to the hidden truth)")
    try:
        r = score_pseudo(args.pseudo, args.split, input_dir=args.input, iou=args.iou, phrase_aware=not args.any_phrase,
                         labelled_only=args.labelled_only, truth_dir=args.truth)
    except (ValueError, ShardError) as e:
        raise SystemExit(f"glip-pl pseudo-score: {e}") from None
    print(f"{r['images']} images scored ({r['unscored_images']} without truth), {r['pseudo_boxes']} pseudo boxes, "
          f"{r['true_boxes']} true boxes")
    print(f"precision {r['precision']:.3f}  recall {r['recall']:.3f}  at IoU {r['iou']:g}"
          f"{'' if r['phrase_aware'] else ' (any phrase)'}")
    print(f"true positives ({r['tp']}): mean IoU {r['matched_mean_iou']:.3f}  at IoU >= 0.75 {r['matched_iou75']:.3f}"
          f"  size ratio {r['matched_size_ratio']:.3f}  centre offset {r['matched_centre_offset']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0
