"""Synthetic grounded scenes: coloured shapes on a noisy background, with boxes, captions and character spans.

The data of the demo and the tests. Scene ``(seed, split, index)`` is a pure function of those numbers, so samples
are generated in parallel, in any order, identically every time. Caption samples keep the true boxes in ``hidden``
(never trained on) so a pseudo-labelling test can score a teacher. Relations are true of the drawn scene, so a
flip that swaps left/right in the caption keeps them true.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .schema import Where
from .writer import write_split

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 80, 215), "yellow": (235, 200, 35)}
SHAPES = ("circle", "square", "triangle")
CATEGORIES = [{"id": 1 + 4 * s + c, "name": f"{colour} {shape}"}
              for s, shape in enumerate(SHAPES) for c, colour in enumerate(COLOURS)]
FLAVOURS = ("detection", "grounding", "caption")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SINGLE_TEMPLATES = ("a {}", "there is a {}", "a {} in the picture")


@dataclass
class SyntheticConfig:
    image_size: int = 256  # square images; a tiny CPU model learns 256x256 scenes in minutes
    min_objects: int = 1
    max_objects: int = 4
    min_frac: float = 0.15  # object side as a fraction of the image side
    max_frac: float = 0.35
    noise: int = 12  # uniform background noise amplitude (0 = plain background)
    colour_jitter: int = 12
    background: tuple = (170, 246)  # each background channel drawn from [lo, hi); (20, 90) = dark scenes
    format: str = "jpg"  # "jpg" (quality 92) or "png"
    # A subset makes data that lacks some concepts, as a gold detection set lacks classes web captions mention.
    category_ids: Optional[tuple] = None

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_frac <= self.max_frac <= 1 or int(self.min_frac * self.image_size) < 4:
            raise ValueError(f"object size fractions must satisfy 0 < min_frac <= max_frac <= 1 with objects of at "
                             f"least 4 px, got {self.min_frac}, {self.max_frac} at image_size {self.image_size}")
        lo, hi = (int(v) for v in self.background)
        if not 0 <= lo < hi <= 256:
            raise ValueError(f"background must be a range lo < hi within 0..256, got {tuple(self.background)}")
        self.background = (lo, hi)
        for name in ("noise", "colour_jitter"):
            if not 0 <= getattr(self, name) <= 255:
                raise ValueError(f"{name} must be in 0..255, got {getattr(self, name)}")
        if self.category_ids is not None:
            ids = tuple(int(i) for i in self.category_ids)
            known = {c["id"] for c in CATEGORIES}
            bad = [i for i in ids if i not in known]
            if not ids or bad or len(set(ids)) != len(ids):
                raise ValueError(f"category_ids must be distinct ids among 1..{len(CATEGORIES)}, got {list(ids)}")
            if len(ids) < self.max_objects:
                raise ValueError(f"category_ids has {len(ids)} classes but a scene may hold {self.max_objects} "
                                 "distinct ones (max_objects)")
            self.category_ids = ids

    @property
    def categories(self) -> list:
        return CATEGORIES if self.category_ids is None else [c for c in CATEGORIES if c["id"] in self.category_ids]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLIT_CODES.get(split, 3), int(index)])


def make_scene(seed: int, split: str, index: int, cfg: SyntheticConfig = SyntheticConfig()) -> dict:
    rng = _rng(seed, split, index)
    S = cfg.image_size
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    if cfg.category_ids is None:
        cats = [int(c) for c in rng.choice(len(CATEGORIES), size=n, replace=False) + 1]  # distinct classes per scene
    else:
        cats = [int(c) for c in rng.choice(sorted(cfg.category_ids), size=n, replace=False)]
    objects = []
    for cat in cats:
        for _ in range(100):  # rejection sampling: objects do not overlap (2 px gap)
            side = int(rng.integers(int(cfg.min_frac * S), int(cfg.max_frac * S) + 1))
            x1, y1 = int(rng.integers(0, S - side + 1)), int(rng.integers(0, S - side + 1))
            box = (x1, y1, x1 + side, y1 + side)
            if all(box[0] >= b[2] + 2 or b[0] >= box[2] + 2 or box[1] >= b[3] + 2 or b[1] >= box[3] + 2
                   for _, b in objects):
                objects.append((cat, box))
                break
    caption, spans = _caption(objects, rng)
    return {"objects": objects, "caption": caption, "spans": spans, "rng": rng}


def _relation(a: tuple, b: tuple) -> str:
    dx = (a[0] + a[2]) - (b[0] + b[2])
    dy = (a[1] + a[3]) - (b[1] + b[3])
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _caption(objects: list, rng: np.random.Generator) -> tuple:
    """"a red circle left of a blue square and a green triangle"."""
    name = {c["id"]: c["name"] for c in CATEGORIES}
    order = list(rng.permutation(len(objects)))
    clauses = []  # list of list[(text, object index or None)]
    if len(order) == 1:
        tpl = SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))]
        pre, post = tpl.split("{}")
        clauses.append([(pre, None), (name[objects[order[0]][0]], order[0]), (post, None)])
    else:
        for k in range(0, len(order), 2):
            i = order[k]
            if k + 1 < len(order):
                j = order[k + 1]
                rel = _relation(objects[i][1], objects[j][1])
                clauses.append([("a ", None), (name[objects[i][0]], i), (f" {rel} a ", None),
                                (name[objects[j][0]], j)])
            else:
                clauses.append([("a ", None), (name[objects[i][0]], i)])
    caption, spans = "", [None] * len(objects)
    for c, clause in enumerate(clauses):
        if c:
            caption += " and " if c == len(clauses) - 1 else ", "
        for text, obj in clause:
            if obj is not None:
                spans[obj] = [[len(caption), len(caption) + len(text)]]
            caption += text
    return caption, spans


def render(scene: dict, cfg: SyntheticConfig = SyntheticConfig()):
    """Draws continue the scene's random stream."""
    from PIL import Image, ImageDraw

    rng, S = scene["rng"], cfg.image_size
    base = rng.integers(cfg.background[0], cfg.background[1], size=3)
    pix = np.broadcast_to(base, (S, S, 3)).astype(np.int16)
    if cfg.noise:
        pix = pix + rng.integers(-cfg.noise, cfg.noise + 1, size=(S, S, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for cat, (x1, y1, x2, y2) in scene["objects"]:
        shape, colour = SHAPES[(cat - 1) // 4], list(COLOURS.values())[(cat - 1) % 4]
        j = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, size=3) if cfg.colour_jitter else np.zeros(3)
        fill = tuple(int(v) for v in np.clip(np.array(colour) + j, 0, 255))
        # the box is [x1, x2) in continuous pixels: the shape covers pixel columns x1 .. x2-1 exactly
        if shape == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif shape == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
        else:
            draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)
    return img


def encode(img, fmt: str) -> tuple:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
        return buf.getvalue(), "png"
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue(), "jpg"


def synthetic_sample(flavour: str, seed: int, split: str, index: int, cfg: SyntheticConfig = SyntheticConfig()):
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    scene = make_scene(seed, split, index, cfg)
    data, ext = encode(render(scene, cfg), cfg.format)
    boxes = [list(map(float, b)) for _, b in scene["objects"]]
    cats = [c for c, _ in scene["objects"]]
    rec = {"id": f"{split}-{index:06d}", "source": f"synthetic-{flavour}", "kind": flavour,
           "width": cfg.image_size, "height": cfg.image_size, "boxes": boxes,
           "extra": {"seed": seed, "split": split, "index": index}}
    if flavour == "detection":
        rec["category_ids"] = cats
    elif flavour == "grounding":
        rec.update(caption=scene["caption"], spans=scene["spans"], category_ids=cats)
    else:
        rec.update(kind="caption", caption=scene["caption"], boxes=[],
                   hidden={"boxes": boxes, "spans": scene["spans"], "category_ids": cats})
    return rec, data, ext


def _build(record: dict):
    """Module level so that writer processes can run it."""
    cfg = SyntheticConfig(**record["cfg"])
    rec, data, ext = synthetic_sample(record["flavour"], record["seed"], record["split"], record["index"], cfg)
    return rec, data, ext, Where(file="<synthetic>", record=rec["id"]), "<synthetic>"


def generate_synthetic(
    out: str,
    flavours=FLAVOURS,
    splits: Optional[dict] = None,
    seed: int = 0,
    cfg: SyntheticConfig = SyntheticConfig(),
    samples_per_shard: Optional[int] = None,
    num_workers: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Shards + ``index.json`` per flavour under ``out``; ``samples_per_shard`` defaults to at least 8 shards a split
    (2 ranks × 4 workers pass the startup check)."""
    splits = splits or {"train": 512, "val": 64}
    result = {}
    for flavour in flavours:
        out_dir = os.path.join(out, flavour)
        result[flavour] = {}
        for split, count in splits.items():
            records = [{"id": f"{split}-{i:06d}", "flavour": flavour, "seed": seed, "split": split, "index": i,
                        "cfg": asdict(cfg), "size_hint": 0} for i in range(count)]
            per_shard = samples_per_shard or max(1, min(64, count // 8))
            result[flavour][split] = write_split(
                out_dir, split, records, _build, source=f"synthetic-{flavour}",
                kind=flavour, source_file="<synthetic>", categories=cfg.categories,
                options={"generator": "synthetic", "seed": seed, "config": asdict(cfg)},
                max_count=per_shard, num_workers=num_workers, verify="header", clip_tolerance=0.0,
                overwrite=overwrite, progress=progress)
    return result
