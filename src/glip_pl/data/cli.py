"""``glip-pl shards {coco,grounding,odvg,captions,synthetic}``: the converters on the command line.

Every sub-command writes ``<out>/<split>-%06d.tar`` + ``<out>/index.json``, prints a summary (samples, shards,
bytes, skipped records by error, clipped boxes) and exits 1 with the error's file/record/field on a bad record
unless ``--on-error skip``. Ctrl-C prints one line and exits 130; the finished shards are kept for a resume.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from .schema import ConversionError


def parse_bytes(text: str) -> int:
    """"256MB", "1.5GiB", "4096" → bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB)")
    mult = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _common(p: argparse.ArgumentParser, split: bool = True) -> None:
    p.add_argument("--out", required=True, help="output folder: shards/<source>")
    if split:
        p.add_argument("--split", default="train", help="split name: files <split>-%%06d.tar (default train)")
        p.add_argument("--source", default=None, help="source name stored in samples (default: --out's name)")
        p.add_argument("--target-bytes", type=parse_bytes, default="256MB", help="shard size target (256MB)")
        p.add_argument("--verify", choices=("full", "header"), default="full",
                       help="decode every image fully (default) or only read its header")
        p.add_argument("--clip-tolerance", type=float, default=1.0,
                       help="boxes at most this many pixels outside the image are clipped (counted), "
                            "beyond is an error (default 1.0)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="bad record: stop with an error naming file/record/field (default), or skip and count")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace shards from a different conversion")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")


def _annotations(p: argparse.ArgumentParser, help: str, dest: str = "ann", first: str = "--ann") -> None:
    # ``glip-pl evaluate`` says --annotations: every converter takes that spelling, its short one and -a too
    names = [first] + [n for n in ("--ann", "--annotations") if n != first] + ["-a"]
    p.add_argument(*names, dest=dest, required=True, metavar="FILE", help=f"{help} ({', '.join(names[1:])} also)")


def _write_kw(args) -> dict:
    kw = dict(num_workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    if hasattr(args, "target_bytes"):
        kw.update(target_bytes=args.target_bytes, verify=args.verify, clip_tolerance=args.clip_tolerance)
    return kw


def _summary(name: str, entry: dict) -> None:
    print(f"{name}: {entry['count']} samples in {len(entry['shards'])} shards ({entry['bytes'] / 2**20:.1f} MiB); "
          f"skipped {entry['skipped_total']} {json.dumps(entry['skipped']) if entry['skipped'] else ''}; "
          f"clipped boxes {entry['clipped_boxes']}; dropped {json.dumps(entry['options'].get('dropped', {}))}")


def _run(fn):
    def wrapped(args) -> int:
        try:
            fn(args)
        except ConversionError as e:
            print(f"error: {e}", file=sys.stderr)
            print("(pass --on-error skip to skip such records; they are counted in index.json)", file=sys.stderr)
            return 1
        except (FileExistsError, ImportError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C: one line, the shell's exit status for SIGINT, nothing published
            print(f"interrupted: nothing new was published in {args.out}; run the same command again to resume "
                  "from the finished shards", file=sys.stderr)
            return 130
        return 0
    return wrapped


@_run
def _coco(args):
    from .convert_coco import convert_coco

    _summary(f"{args.out}/{args.split}", convert_coco(args.ann, args.images, args.out, args.split,
                                                      source=args.source, on_error=args.on_error, **_write_kw(args)))


@_run
def _grounding(args):
    from .convert_grounding import convert_grounding

    dirs = dict(kv.split("=", 1) for kv in args.image_dir or [])
    _summary(f"{args.out}/{args.split}", convert_grounding(
        args.ann, args.images, args.out, args.split, image_dirs=dirs or None, source=args.source,
        on_error=args.on_error, **_write_kw(args)))


@_run
def _odvg(args):
    from .convert_odvg import convert_odvg

    _summary(f"{args.out}/{args.split}", convert_odvg(args.jsonl, args.images, args.out, args.split,
                                                      label_map=args.label_map, source=args.source,
                                                      on_error=args.on_error, **_write_kw(args)))


@_run
def _captions(args):
    from .convert_captions import convert_captions

    _summary(f"{args.out}/{args.split}", convert_captions(
        args.out, args.split, table=args.table, images_dir=args.images, img2dataset=args.img2dataset,
        image_col=args.image_col, caption_col=args.caption_col, id_col=args.id_col,
        columns=args.columns.split(",") if args.columns else None, source=args.source, on_error=args.on_error,
        **_write_kw(args)))


def _pair(text: str, kind, what: str) -> tuple:
    """"A,B" as two numbers of ``kind``, or a ValueError saying ``what`` the flag takes."""
    parts = text.split(",")
    try:
        if len(parts) == 2:
            return kind(parts[0]), kind(parts[1])
    except ValueError:
        pass
    raise ValueError(f"{what}, got {text!r}")


@_run
def _synthetic(args):
    from .synthetic import SyntheticConfig, generate_synthetic

    ids = None if args.classes is None else tuple(int(i) for i in args.classes.split(",") if i.strip())
    lo, hi = _pair(args.object_size, float, "--object-size takes MIN,MAX (fractions of the image side)")
    bg = _pair(args.background, int, "--background takes LO,HI (channel values)")
    cfg = SyntheticConfig(image_size=args.image_size, min_objects=args.min_objects, max_objects=args.max_objects,
                          min_frac=lo, max_frac=hi, noise=args.noise, colour_jitter=args.colour_jitter,
                          background=bg, format=args.format, category_ids=ids)
    res = generate_synthetic(args.out, flavours=args.flavours.split(","), splits={"train": args.train, "val": args.val},
                             seed=args.seed, cfg=cfg, samples_per_shard=args.samples_per_shard,
                             num_workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    for flavour, splits in res.items():
        for split, entry in splits.items():
            _summary(f"{args.out}/{flavour}/{split}", entry)


def register(subparsers) -> None:
    """Add ``shards`` and its sub-commands to the ``glip-pl`` parser."""
    shards = subparsers.add_parser("shards", help="convert datasets to WebDataset shards (or generate synthetic ones)")
    sub = shards.add_subparsers(dest="shards_command", metavar="FORMAT")
    shards.set_defaults(func=lambda a: (shards.print_help(), 2)[1])

    p = sub.add_parser("coco", help="COCO-format detection json + images (COCO, LVIS, Objects365, ODinW)")
    _annotations(p, "annotation json")
    p.add_argument("--images", default=None, help="image folder (file_name is relative to it)")
    _common(p)
    p.set_defaults(func=_coco)

    p = sub.add_parser("grounding", help="MDETR-style grounding json (GoldG, Flickr30k entities)")
    _annotations(p, "annotation json, e.g. final_mixed_train_no_coco.json")
    p.add_argument("--images", default=None, help="image folder")
    p.add_argument("--image-dir", action="append", metavar="SOURCE=DIR",
                   help="folder for images whose data_source is SOURCE (e.g. coco=.../train2014 gqa=.../images)")
    _common(p)
    p.set_defaults(func=_grounding)

    p = sub.add_parser("odvg", help="ODVG jsonl (Open-GroundingDino), detection or grounding")
    _annotations(p, "annotation jsonl, one image record per line", dest="jsonl", first="--jsonl")
    p.add_argument("--images", default=None, help="image folder")
    p.add_argument("--label-map", default=None, help='detection label map json {"0": "person", ...}')
    _common(p)
    p.set_defaults(func=_odvg)

    p = sub.add_parser("captions", help="image-caption pairs: a tsv/csv/jsonl/parquet table, or img2dataset output")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--table", help="table of image paths and captions")
    g.add_argument("--img2dataset", help="img2dataset output folder (output_format webdataset)")
    p.add_argument("--images", default=None, help="folder the table's image paths are relative to")
    p.add_argument("--image-col", default="image", help="column of image paths or URLs (image)")
    p.add_argument("--caption-col", default="caption", help="column of captions (caption)")
    p.add_argument("--id-col", default=None, help="column of unique ids (default: row number)")
    p.add_argument("--columns", default=None, help="column names of a header-less tsv/csv, e.g. caption,image")
    _common(p)
    p.set_defaults(func=_captions)

    p = sub.add_parser("synthetic", help="generate the synthetic shapes dataset (demo and tests)")
    p.add_argument("--train", type=int, default=512, help="train samples per flavour (512)")
    p.add_argument("--val", type=int, default=64, help="val samples per flavour (64)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the scenes (0)")
    p.add_argument("--image-size", type=int, default=256, help="image side in pixels (256)")
    p.add_argument("--min-objects", type=int, default=1, help="fewest objects per scene (1)")
    p.add_argument("--max-objects", type=int, default=4, help="most objects per scene (4)")
    p.add_argument("--object-size", default="0.15,0.35", metavar="MIN,MAX",
                   help="object side as a fraction of the image side (0.15,0.35)")
    p.add_argument("--noise", type=int, default=12, help="background noise amplitude, 0..255 (12; 0 = plain)")
    p.add_argument("--background", default="170,246", metavar="LO,HI",
                   help="background channel range (170,246: light; 20,90: dark scenes)")
    p.add_argument("--colour-jitter", type=int, default=12, help="per-object colour jitter amplitude, 0..255 (12)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image encoding (jpg)")
    p.add_argument("--flavours", default="detection,grounding,caption",
                   help="comma-separated sets to write, each a folder under --out (detection,grounding,caption)")
    p.add_argument("--classes", default=None, metavar="IDS",
                   help="comma-separated category ids scenes may hold (default: all 12; ids 1 + 4*shape + colour, "
                        "shapes circle/square/triangle, colours red/green/blue/yellow)")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="default: min(64, split size // 8), so each split has at least 8 shards")
    _common(p, split=False)
    p.set_defaults(func=_synthetic)
