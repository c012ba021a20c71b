"""``glip-pl predict --ckpt CKPT --image PATH_OR_DIR --prompt "a cat. a remote control" --out DIR``.

Writes, per image, ``DIR/<file name>.json`` (caption, phrases with character spans, detections: box x1,y1,x2,y2 in
original pixels, score, phrase, spans) and ``DIR/<file name>.png`` (boxes and phrases drawn), plus
``DIR/predictions.json`` with all images and the files that could not be read. Detections below ``--threshold`` are
left out of all of them. The output names keep the input's extension (``cat.jpg`` → ``cat.jpg.json``,
``cat.jpg.png``), so ``cat.jpg`` and ``cat.png`` in one folder get outputs of their own, and no output can be named
``predictions.json`` (every output name holds an image extension before ``.json`` / ``.png``).

Defaults come from the checkpoint: images are resized as it was validated (``data.val_size`` / ``val_max_size`` of
the config a Lightning checkpoint saves; 800/1333, the official test size, for a model file that records none), and
the device is the GPU when there is one. ``--threshold`` (0.4) is the one score cut: detections below it are left
out, and the post-processor's candidate threshold (the model's ``score_thresh``, 0.05) is lowered to it when it is
lower, so ``--threshold 0`` keeps every candidate. LightningCLI's predict over a recipe's datamodule is
``glip-pl predict-batch --config RECIPE.yaml``.

An unreadable image is reported on stderr (one line naming it and why) and counted; the other images are still
predicted. Exit status: 0 when every image was predicted, 1 when some could not be, 2 for a bad argument,
checkpoint, prompt or ``--image`` path.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SUMMARY = "predictions.json"
# The display cut. The checkpoint's own score_thresh (0.05) is the candidate cut of the official post-processor, made
# for AP, which wants every candidate ranked; a picture wants one box per object. Measured on the suite's shared tiny
# checkpoint (pretrained_tiny, box AP ~0.3) at its validation size, 16 synthetic val scenes with 34 objects: at 0.5
# it draws 14 objects (its scores rarely pass 0.55), at 0.4 34 objects, one per true object and none elsewhere, at 0.3
# 35 and at 0.2 54. Overlapping phrases are folded into one tag (draw.py), so the lower cut stays readable.
DEFAULT_THRESHOLD = 0.4


class _DeprecatedThreshold(argparse.Action):
    """``--score-thresh``: an old name of ``--threshold``; sets it and says so once per command."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not getattr(namespace, "_warned_score_thresh", False):
            print(f"glip-pl predict: warning: {option_string} is deprecated; it is --threshold now", file=sys.stderr)
            namespace._warned_score_thresh = True
        namespace.threshold = values


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        return v

    return parse


def _score(text: str) -> float:
    """A score threshold: a finite number in [0, 1] (``nan`` would keep nothing, silently)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a score in [0, 1], got {text!r}")
    return v


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="detect the phrases of a prompt in images; writes json and PNGs",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="model checkpoint (glip_pl model file or Lightning checkpoint)")
    p.add_argument("--image", required=True, help="an image file or a folder of images")
    p.add_argument("--prompt", required=True, help='phrases separated by ".", e.g. "a cat. a remote control"')
    p.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    p.add_argument("--threshold", type=_score, default=DEFAULT_THRESHOLD,
                   help=f"keep detections scoring at least this, in [0, 1] (default {DEFAULT_THRESHOLD}); below the "
                        "model's candidate threshold (0.05) it lowers that too")
    p.add_argument("--score-thresh", type=_score, action=_DeprecatedThreshold, dest="threshold",
                   help="deprecated name of --threshold")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--min-size", type=_int_at_least(0), default=None,
                   help="shorter image side fed to the model; 0 keeps the original size (default: the checkpoint's "
                        "validation size, else 800)")
    p.add_argument("--max-size", type=_int_at_least(1), default=None,
                   help="longer side limit (default: the checkpoint's validation limit, else 1333)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=1, help="images per forward pass (default 1)")
    p.add_argument("--loader", default=None,
                   help="name of a checkpoint loader (glip_pl.checkpoints.glip.DEFAULT_LOADERS; default: try all)")
    p.add_argument("--no-draw", action="store_true", help="write json only")
    p.set_defaults(func=run)


def output_names(image: Path) -> tuple:
    """(json name, drawing name) of one input image: its whole file name plus ``.json`` / ``.png``."""
    return f"{image.name}.json", f"{image.name}.png"


def run(args) -> int:
    from ..model.types import GLIPInputError
    from .draw import draw_prediction
    from .predictor import Predictor, list_images, to_pil

    try:
        files = list_images(args.image)
        out = Path(args.out)
        inputs = {f.resolve() for f in files}
        for f in files:  # --out may be the image folder: a drawing must never replace an input
            for name in output_names(f):
                if (out / name).resolve() in inputs:
                    raise GLIPInputError(f"output {str(out / name)!r} of {str(f)!r} would overwrite an input image; "
                                         "choose another --out")
        sizes = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v is not None}
        predictor = Predictor.from_checkpoint(args.ckpt, loader=args.loader, device=args.device, **sizes)
        candidate = getattr(getattr(predictor.model, "cfg", None), "score_thresh", 0.0)
        if args.threshold < candidate:  # else --threshold 0 could not show what the post-processor cut at 0.05
            predictor.post["score_thresh"] = args.threshold
        predictor.as_prompt(args.prompt)  # a bad prompt fails before any image is read
    except GLIPInputError as e:
        print(f"glip-pl predict: error: {e}", file=sys.stderr)
        return 2
    settings = {"min_size": predictor.min_size, "max_size": predictor.max_size, "threshold": args.threshold,
                "device": str(predictor.device)}
    print(f"resize: shorter side {predictor.min_size}, longer at most {predictor.max_size}; threshold "
          f"{args.threshold}; device {predictor.device}")
    out.mkdir(parents=True, exist_ok=True)
    summary, failed = [], []

    def fail(f: Path, e: Exception) -> None:
        why = str(e) if isinstance(e, GLIPInputError) else f"image {str(f)!r}: {type(e).__name__}: {e}"
        print(f"glip-pl predict: error: {why}", file=sys.stderr)
        failed.append({"image": str(f), "error": why})

    for s in range(0, len(files), args.batch_size):
        batch, images = [], []
        for f in files[s : s + args.batch_size]:
            try:
                images.append(to_pil(f))
                batch.append(f)
            except Exception as e:  # any decoder failure is this file's problem, not the folder's
                fail(f, e)
        if not batch:
            continue
        try:
            preds = predictor.predict_batch(images, args.prompt, batch_size=len(images))
        except GLIPInputError:  # find the image it was about: one by one
            preds = []
            for f, im in zip(batch, images):
                try:
                    preds.extend(predictor.predict_batch([im], args.prompt, batch_size=1))
                except GLIPInputError as e:
                    fail(f, e)
                    preds.append(None)
        for f, im, pred in zip(batch, images, preds):
            if pred is None:
                continue
            rec = {"image": str(f), **pred.to_json(args.threshold)}
            json_name, png_name = output_names(f)
            (out / json_name).write_text(json.dumps(rec, indent=2) + "\n")
            if not args.no_draw:
                draw_prediction(im, pred, threshold=args.threshold).save(out / png_name)
            summary.append(rec)
            print(f"{f}: {len(rec['detections'])} detections (score >= {args.threshold})")
    (out / SUMMARY).write_text(json.dumps({"predicted": len(summary), "failed": len(failed), "errors": failed,
                                           "settings": settings, "images": summary}, indent=2) + "\n")
    print(f"wrote {len(summary)} image(s) to {out}" + (f"; {len(failed)} failed (listed in {out / SUMMARY})"
                                                        if failed else ""))
    return 1 if failed else 0
