"""``glip-pl predict --ckpt CKPT --image PATH_OR_DIR --prompt "a cat. a remote control" --out DIR``.

Writes, per image, ``DIR/<stem>.json`` (caption, phrases with character spans, detections: box x1,y1,x2,y2 in
original pixels, score, phrase, spans) and ``DIR/<stem>.png`` (boxes and phrases drawn), plus
``DIR/predictions.json`` with all images. Detections below ``--threshold`` are left out of both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="detect the phrases of a prompt in images; writes json and PNGs",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="model checkpoint (glip_pl model file or Lightning checkpoint)")
    p.add_argument("--image", required=True, help="an image file or a folder of images")
    p.add_argument("--prompt", required=True, help='phrases separated by ".", e.g. "a cat. a remote control"')
    p.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    p.add_argument("--threshold", type=float, default=0.5, help="keep detections scoring at least this (default 0.5)")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="candidate threshold of the post-processor (default: the model's, 0.05 as the official)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--min-size", type=int, default=800, help="shorter image side fed to the model (default 800)")
    p.add_argument("--max-size", type=int, default=1333, help="longer side limit (default 1333)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    p.add_argument("--loader", default=None, help="name of a registered checkpoint loader (default: try all)")
    p.add_argument("--no-draw", action="store_true", help="write json only")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..model.types import GLIPInputError
    from .draw import draw_prediction
    from .predictor import Predictor, list_images, to_pil

    try:
        files = list_images(args.image)
        predictor = Predictor.from_checkpoint(args.ckpt, loader=args.loader, device=args.device,
                                              min_size=args.min_size, max_size=args.max_size,
                                              **({} if args.score_thresh is None else {"score_thresh": args.score_thresh}))
        predictor.as_prompt(args.prompt)  # a bad prompt fails before any image is read
    except GLIPInputError as e:
        print(f"glip-pl predict: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for s in range(0, len(files), max(1, args.batch_size)):
        batch = files[s : s + args.batch_size]
        try:
            images = [to_pil(f) for f in batch]
            preds = predictor.predict_batch(images, args.prompt, batch_size=len(images))
        except GLIPInputError as e:
            print(f"glip-pl predict: error: {e}", file=sys.stderr)
            return 2
        for f, im, pred in zip(batch, images, preds):
            rec = {"image": str(f), **pred.to_json(args.threshold)}
            (out / f"{f.stem}.json").write_text(json.dumps(rec, indent=2) + "\n")
            if not args.no_draw:
                draw_prediction(im, pred, threshold=args.threshold).save(out / f"{f.stem}.png")
            summary.append(rec)
            print(f"{f}: {len(rec['detections'])} detections (score >= {args.threshold})")
    (out / "predictions.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {len(summary)} image(s) to {out}")
    return 0
