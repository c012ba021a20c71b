"""``glip-pl import-official`` / ``glip-pl export-official``: released GLIP checkpoints ⇄ glip_pl checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path


def _import(args) -> int:
    from ..hub import OFFICIAL_WEIGHTS, is_official_name, official_weights, resolve_official
    from ..model.types import GLIPInputError
    from .glip import CheckpointError
    from .official import import_official

    try:
        src, preset = args.src, args.preset
        if is_official_name(src) and not Path(src).is_file():
            known = official_weights(src)
            if preset is not None and preset != known.preset:
                raise GLIPInputError(f"{src!r} is a {known.preset!r} checkpoint ({known.description}); "
                                     f"--preset {preset} does not fit it (leave --preset out)")
            preset = known.preset
            src = resolve_official(src)
            print(f"{args.src}: {known.description} -> {src}")
        elif not Path(src).is_file():
            known = ", ".join(OFFICIAL_WEIGHTS)
            raise GLIPInputError(f"{src!r}: no such checkpoint file, and not a released model's name ({known})")
        elif preset is None:
            raise GLIPInputError(f"{src!r}: --preset is needed for a checkpoint file (a released model's name, "
                                 "e.g. glip_t, brings its own)")
        report = import_official(src, args.out, preset, use_ema=args.ema)
    except (CheckpointError, GLIPInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary(limit=args.limit))
    print(f"wrote {args.out} (preset {preset}, official_compat=True{', EMA weights' if args.ema else ''})")
    return 0


def _export(args) -> int:
    from .glip import CheckpointError
    from .official import export_official

    try:
        official = export_official(args.ckpt, args.out, preset=args.preset)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(official)} tensors in the official naming (under 'model', prefixed 'module.')")
    return 0


def register(subparsers) -> None:
    from ..hub import OFFICIAL_WEIGHTS
    from ..model.presets import PRESETS

    p = subparsers.add_parser(
        "import-official",
        help="convert a released GLIP checkpoint (GLIP-T, GLIP-L, GLIP-T(A)) into a glip_pl checkpoint",
        description="Read an official GLIP .pth safely (weights_only), map every tensor onto glip_pl with shape "
        "checks, print the report (mapped / ignored with reason / missing / unexpected) and write a glip_pl "
        "checkpoint built with official_compat=True. Anything missing or unexpected outside the documented "
        "ignore list is an error (docs/official_compat.md).",
    )
    p.add_argument("src", help="official checkpoint (.pth), or a released model's name ("
                   + ", ".join(OFFICIAL_WEIGHTS) + ") fetched from the Hugging Face Hub cache")
    p.add_argument("out", help="glip_pl checkpoint to write")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="architecture of the checkpoint (needed for a file; a name brings its own)")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (model_ema) instead of model")
    p.add_argument("--limit", type=int, default=20, help="list at most this many names per problem kind")
    p.set_defaults(func=_import)

    q = subparsers.add_parser(
        "export-official",
        help="write a glip_pl checkpoint in the official GLIP naming (readable by the official code)",
        description="Write {'model': {'module.' + official name: tensor}} including the buffers the official "
        "model has (Swin relative_position_index, anchor cell_anchors, the unused cls_logits).",
    )
    q.add_argument("ckpt", help="glip_pl checkpoint (from import-official or training)")
    q.add_argument("out", help="official-layout .pth to write")
    q.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="only needed when the checkpoint does not record its preset")
    q.set_defaults(func=_export)
