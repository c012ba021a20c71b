"""Data-loading throughput: WebDataset shards vs. loose JPEG files + one COCO json, same transforms, same run.

Not a test. Builds a detection set of synthetic scenes as loose JPEG files with a COCO json, converts it with the
real converter (``glip-pl shards coco``), then times, per data-loader worker process, decode + prompt + augment
(multi-scale resize at the training resolution, flip) + tokenise + collate:
  shards     ``build_loader`` streaming the shards (sequential tar reads, shuffle buffer);
  loose      a map-style Dataset over the same images (random access: open + read one JPEG per sample, the
             COCO json indexed in memory), shuffled DataLoader, the very same stage functions.
Both run ``--repeats`` times, interleaved, best run reported. Prints a table and writes json.

    python benchmarks/bench_data.py --images 400 --image-size 640 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset


def build_fixture(work: str, n: int, size: int) -> tuple:
    """n synthetic detection scenes as loose JPEG + COCO json, and the same converted to shards."""
    from glip_pl.data.convert_coco import convert_coco
    from glip_pl.data.synthetic import CATEGORIES, SyntheticConfig, synthetic_sample

    img_dir, ann = os.path.join(work, "loose", "images"), os.path.join(work, "loose", "instances.json")
    shards = os.path.join(work, "shards", "bench-coco")
    if not os.path.exists(ann):
        os.makedirs(img_dir, exist_ok=True)
        cfg = SyntheticConfig(image_size=size)
        images, anns = [], []
        for i in range(n):
            rec, data, _ = synthetic_sample("detection", 0, "train", i, cfg)
            name = f"{i:08d}.jpg"
            with open(os.path.join(img_dir, name), "wb") as f:
                f.write(data)
            images.append({"id": i, "file_name": name, "width": size, "height": size})
            for b, c in zip(rec["boxes"], rec["category_ids"]):
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "iscrowd": 0,
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
        with open(ann, "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": CATEGORIES}, f)
    if not os.path.exists(os.path.join(shards, "index.json")):
        total = sum(os.path.getsize(os.path.join(img_dir, x)) for x in os.listdir(img_dir))
        convert_coco(ann, img_dir, shards, "train", target_bytes=max(total // 8, 1), progress=False)
    return img_dir, ann, shards


class LooseCoco(Dataset):
    """Random-access baseline: the COCO json in memory, one JPEG file opened per sample."""

    def __init__(self, ann: str, img_dir: str, tokenizer, transforms, prompts, seed: int = 0):
        from glip_pl.data.prompting import CategoryTable

        with open(ann) as f:
            data = json.load(f)
        self.images = data["images"]
        self.by_image = {}
        for a in data["annotations"]:
            self.by_image.setdefault(a["image_id"], []).append(a)
        self.table = CategoryTable(data["categories"], tokenizer)
        self.img_dir, self.tokenizer, self.transforms, self.prompts, self.seed = img_dir, tokenizer, transforms, \
            prompts, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        from glip_pl.data.prompting import build_prompt, tokenize_sample
        from glip_pl.data.schema import Sample
        from glip_pl.data.transforms import apply_transforms

        im = self.images[i]
        with open(os.path.join(self.img_dir, im["file_name"]), "rb") as f:
            img = Image.open(f)
            img.load()
        img = img.convert("RGB")
        anns = self.by_image.get(im["id"], [])
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        s = Sample(id=str(im["id"]), source="loose", kind="detection", image=img, width=im["width"],
                   height=im["height"], boxes=boxes, category_ids=[a["category_id"] for a in anns])
        rng = random.Random(f"{self.seed}-{i}")
        s = build_prompt(s, self.table, rng, self.prompts)
        s = apply_transforms(s, rng, self.transforms)
        return tokenize_sample(s, self.tokenizer, self.prompts.max_text_len)


def _collate(samples):
    from glip_pl.data.batch import collate

    return collate(samples)


def time_loader(loader) -> tuple:
    t, n = time.perf_counter(), 0
    for b in loader:
        n += len(b)
    return n, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/glip_pl_bench_data", help="where the fixture is built (kept)")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--image-size", type=int, default=640)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--preset", choices=("official", "tiny"), default="official",
                   help="official: short side 480-800, long <= 1333; tiny: short side 224-288, long <= 512")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "bench_data.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from glip_pl.data import PromptConfig, SourceSpec, TransformConfig, build_loader
    from glip_pl.model.language import build_tokenizer

    tok = build_tokenizer()
    transforms = TransformConfig() if args.preset == "official" else TransformConfig.tiny()
    prompts = PromptConfig()
    t0 = time.perf_counter()
    img_dir, ann, shards = build_fixture(args.work, args.images, args.image_size)
    print(f"fixture: {args.images} images {args.image_size}x{args.image_size} in {args.work} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    rows = []
    for w in args.workers:
        best = {}
        for r in range(args.repeats):
            shard_loader = build_loader([SourceSpec(shards)], tok, args.batch_size, num_workers=w, seed=r,
                                        train=True, resampled=False, transforms=transforms, prompts=prompts,
                                        shuffle_buffer=100)
            loose = DataLoader(LooseCoco(ann, img_dir, tok, transforms, prompts, seed=r), batch_size=args.batch_size,
                               shuffle=True, num_workers=w, collate_fn=_collate, drop_last=True)
            for name, loader in (("shards", shard_loader), ("loose JPEG + COCO json", loose)):
                n, sec = time_loader(loader)
                print(f"  {name}, {w} worker(s), run {r}: {n} samples in {sec:.2f} s", file=sys.stderr)
                if name not in best or n / sec > best[name][0] / best[name][1]:
                    best[name] = (n, sec)
        for name, (n, sec) in best.items():
            rows.append({"loader": name, "workers": w, "samples": n, "seconds": round(sec, 3),
                         "samples_per_s": round(n / sec, 1), "samples_per_s_per_worker": round(n / sec / w, 1)})

    head = f"| loader | workers | samples | seconds | samples/s | samples/s per worker |\n|---|---|---|---|---|---|"
    print(f"\nData loading, {args.preset} transforms ({transforms.min_sizes} / {transforms.max_size}), "
          f"{args.images} images {args.image_size}², batch {args.batch_size}, best of {args.repeats}\n")
    print(head)
    for r in rows:
        print(f"| {r['loader']} | {r['workers']} | {r['samples']} | {r['seconds']} | {r['samples_per_s']} | "
              f"{r['samples_per_s_per_worker']} |")
    result = {"command": "python benchmarks/bench_data.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "platform": platform.platform()},
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwritten {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
