"""Inference for users: ``Predictor(model).predict(image, "a cat. a remote control")``.

Images (PIL, path, numpy HWC, or (3,H,W) tensors) are resized as the official test transform (shorter side
``min_size`` = 800, longer side at most ``max_size`` = 1333, PIL bilinear; reference §5) and boxes come back in
original image pixels. A prompt is split into phrases at "."; a prompt longer than the text limit (256 tokens) is
chunked into whole phrases automatically, the image backbone running once for all chunks
(``glip_pl.eval.chunked``). Each detection carries its phrase text and the phrase's character spans in the
caption the user gave.

Checkpoints: ``Predictor.from_checkpoint(path)`` reads them through ``glip_pl.checkpoints.load_model``: each of
``loaders`` ({name: ``fn(path) -> GLIP``, raising to decline}; default ``DEFAULT_LOADERS``, glip_pl model files
and Lightning checkpoints that record their preset) in order until one returns a model, or the one ``loader=``
names (a name or a callable).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..checkpoints.glip import CheckpointLoader, load_model, read_run_config
from ..model.prompts import Prompt
from ..model.types import Detections, GLIPInputError
from .chunked import EncodedChunks, PromptChunk, chunk_prompt, detect_chunks, merge_chunk_detections

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------- images


def resized_size(h: int, w: int, min_size: int = 800, max_size: Optional[int] = 1333) -> tuple:
    """(h, w) after the official test resize: shorter side → ``min_size`` unless the longer would pass ``max_size``."""
    size = float(min_size)
    if max_size is not None:
        lo, hi = float(min(h, w)), float(max(h, w))
        if hi / lo * size > max_size:
            size = float(int(round(max_size * lo / hi)))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), int(size)
    return int(size), int(size * w / h)


def to_pil(image):
    """PIL RGB image from a PIL image, a path, an (H,W,3) uint8 array or a (3,H,W) uint8 / [0,1] float tensor."""
    from PIL import Image

    from ..data.image_io import open_rgb, to_rgb  # one decoder for shards, converters and predict

    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            raise GLIPInputError(f"image {os.fspath(image)!r}: no such file")
        try:
            return open_rgb(p)
        except Exception as e:  # PIL.UnidentifiedImageError and friends
            raise GLIPInputError(f"image {os.fspath(image)!r}: cannot be read as an image ({e})") from None
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise GLIPInputError(f"an image tensor must be (3, H, W); got shape {tuple(t.shape)}")
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        if t.dtype != torch.uint8:
            t = (t.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
        return Image.fromarray(t.permute(1, 2, 0).contiguous().numpy(), "RGB")
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        if a.ndim != 3 or a.shape[2] != 3:
            raise GLIPInputError(f"an image array must be (H, W, 3); got shape {a.shape}")
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float64), 0, 1) * 255.0).round().astype(np.uint8)
        return Image.fromarray(a, "RGB")
    raise GLIPInputError(f"unsupported image type {type(image).__name__}; give a PIL image, a path, an array or a tensor")


def load_image_record(record: dict, image_root: Optional[str]):
    """The PIL image of a COCO/LVIS/MDETR image record: ``file_name`` (or the ``coco_url`` basename) under
    ``image_root``, also looked up in ``train2017``/``val2017``/``train2014``/``val2014`` sub-folders (LVIS v1 images
    are COCO 2017 images and carry only ``coco_url``)."""
    name = record.get("file_name") or (record.get("coco_url") or "").rsplit("/", 1)[-1]
    if not name:
        raise GLIPInputError(f"image record {record.get('id')}: no 'file_name' or 'coco_url'")
    root = Path(image_root or ".")
    cands = [root / name] + [root / sub / Path(name).name for sub in ("train2017", "val2017", "train2014", "val2014")]
    if "coco_url" in record:
        parts = record["coco_url"].rstrip("/").split("/")
        if len(parts) >= 2:
            cands.insert(1, root / parts[-2] / parts[-1])
    for c in cands:
        if c.is_file():
            return to_pil(c)
    raise GLIPInputError(f"image record {record.get('id')}: {name!r} not found under {os.fspath(root)!r}")


def list_images(path) -> list:
    """A file → [it]; a folder → its image files (sorted, not recursive)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not files:
            raise GLIPInputError(f"{os.fspath(p)!r}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return files
    if not p.is_file():
        raise GLIPInputError(f"{os.fspath(p)!r}: no such image file or folder")
    return [p]


# --------------------------------------------------------------------------------------------- results


@dataclass
class Prediction:
    """Detections of one image for one prompt; boxes x1,y1,x2,y2 in original pixels, sorted by score."""

    detections: Detections
    prompt: Prompt
    image_size: tuple  # (h, w) of the original image

    def __len__(self) -> int:
        return len(self.detections)

    @property
    def boxes(self) -> Tensor:
        return self.detections.boxes

    @property
    def scores(self) -> Tensor:
        return self.detections.scores

    @property
    def labels(self) -> Tensor:
        return self.detections.labels

    @property
    def phrases(self) -> list:
        """Phrase text of each detection."""
        return [self.prompt.names[i] for i in self.detections.labels.tolist()]

    @property
    def spans(self) -> list:
        """Character spans (in the prompt's caption) of each detection's phrase."""
        return [[list(s) for s in self.prompt.spans[i]] for i in self.detections.labels.tolist()]

    def to_dicts(self, threshold: float = 0.0) -> list:
        out = []
        for b, s, l in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()):
            if s < threshold:
                continue
            out.append({"box": [round(float(v), 2) for v in b], "score": float(s), "label": int(l),
                        "phrase": self.prompt.names[l], "spans": [list(x) for x in self.prompt.spans[l]]})
        return out

    def to_json(self, threshold: float = 0.0) -> dict:
        h, w = self.image_size
        return {"caption": self.prompt.caption, "height": int(h), "width": int(w),
                "phrases": [{"text": n, "spans": [list(x) for x in sp]} for n, sp in zip(self.prompt.names, self.prompt.spans)],
                "detections": self.to_dicts(threshold)}


# --------------------------------------------------------------------------------------------- defaults

DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE = 800, 1333  # the official test resize


def pick_device(device: Union[None, str, torch.device] = None) -> torch.device:
    """``device`` as given; ``None`` / ``"auto"``: the GPU when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise GLIPInputError(f"device {device!r}: {e}") from None


def checkpoint_defaults(path) -> dict:
    """Image sizes the checkpoint was validated at: ``{"min_size", "max_size"}`` from ``data.val_size`` /
    ``data.val_max_size`` of the config a Lightning checkpoint of the GLIP module saves (``glip_pl_config``, also kept
    by ``glip-pl consolidate``); ``{}`` when it records none (a glip_pl model file, an imported official model: the
    official 800/1333 apply). A model trained on 256 px scenes and fed 800 px ones sees objects three times the size it
    learnt and fires on their parts."""
    text = read_run_config(path)
    if text is None:
        return {}
    try:
        import yaml
    except ImportError:  # the core install (no training extra) predicts from model files; sizes are printed
        return {}
    try:
        data = (yaml.safe_load(text) or {}).get("data") or {}
    except (yaml.YAMLError, AttributeError):
        return {}
    if isinstance(data, dict) and isinstance(data.get("init_args"), dict):  # saved as class_path + init_args
        data = data["init_args"]
    out = {}
    for key, name in (("val_size", "min_size"), ("val_max_size", "max_size")):
        v = data.get(key) if isinstance(data, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out[name] = v
    return out


# --------------------------------------------------------------------------------------------- predictor


class Predictor:
    """Run a GLIP model on images and free-text prompts.

    ``Predictor(model, device="cpu", min_size=800, max_size=1333, chunk_batch=1, **post)`` (``device="auto"``: the
    GPU when there is one); ``post`` overrides
    post-processing options (``score_thresh``, ``nms_thresh``, ``detections_per_img``, ``pre_nms_top_n``).
    """

    def __init__(self, model, device: Union[None, str, torch.device] = "cpu", min_size: int = DEFAULT_MIN_SIZE,
                 max_size: Optional[int] = DEFAULT_MAX_SIZE, chunk_batch: int = 1, max_text_len: Optional[int] = None,
                 **post):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.min_size, self.max_size = int(min_size), max_size
        self.chunk_batch = int(chunk_batch)
        self.max_text_len = int(max_text_len or getattr(getattr(model, "cfg", None), "max_text_len", 256))
        self.post = dict(post)
        self._encoded: dict = {}

    @classmethod
    def from_checkpoint(cls, path, loader: Union[None, str, CheckpointLoader] = None,
                        loaders: Optional[Mapping[str, CheckpointLoader]] = None, **kwargs) -> "Predictor":
        """Build the model a checkpoint describes (see the module docstring for loaders) and wrap it. ``min_size`` /
        ``max_size`` not given are the checkpoint's validation sizes when it records them (``checkpoint_defaults``),
        else 800/1333."""
        model = load_model(path, loader, loaders)
        recorded = checkpoint_defaults(path)
        for key, official in (("min_size", DEFAULT_MIN_SIZE), ("max_size", DEFAULT_MAX_SIZE)):
            kwargs.setdefault(key, recorded.get(key, official))
        return cls(model, **kwargs)

    @classmethod
    def from_pretrained(cls, name: str, use_ema: bool = False, **kwargs) -> "Predictor":
        """A released GLIP model by name (``glip_t``, ``glip_t_a``, ``glip_l``, ...; ``glip_pl.hub.OFFICIAL_WEIGHTS``):
        the official file comes from the Hugging Face cache (downloaded once when the network is allowed) and is
        converted into a glip_pl checkpoint once (``glip_pl.hub.official_checkpoint``)."""
        from ..hub import official_checkpoint

        return cls.from_checkpoint(official_checkpoint(name, use_ema=use_ema), loader="glip_pl", **kwargs)

    # ---------------------------------------------------------------- inputs
    def prepare(self, image) -> tuple:
        """(uint8 (3,h,w) tensor at network size, (H, W) original size)."""
        from PIL import Image

        pil = to_pil(image)
        W, H = pil.size
        h, w = resized_size(H, W, self.min_size, self.max_size) if self.min_size else (H, W)
        if (h, w) != (H, W):
            pil = pil.resize((w, h), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        return t, (H, W)

    def as_prompt(self, prompt) -> Prompt:
        return self.model.as_prompt(prompt)

    def chunks_for(self, prompt, max_per_chunk: Optional[int] = None) -> list:
        """The prompt (caption, list of names or ``Prompt``) as chunks that fit the text limit."""
        return chunk_prompt(self.as_prompt(prompt), self.model.tokenizer, max_len=self.max_text_len,
                            max_per_chunk=max_per_chunk)

    def _encode(self, chunks, cache_text: bool) -> EncodedChunks:
        """Tokens/maps/text features of a chunk list, cached while the same list object is reused (e.g. a dataset's
        class-name chunks across batches). The cache assumes frozen weights (inference)."""
        if isinstance(chunks, EncodedChunks):
            return chunks
        key = (id(chunks), cache_text)
        hit = self._encoded.get(key)
        if hit is None or hit[0] is not chunks:
            if len(self._encoded) >= 8:
                self._encoded.clear()
            hit = (chunks, EncodedChunks(self.model, chunks, cache_text=cache_text))  # holds chunks: id stays unique
            self._encoded[key] = hit
        return hit[1]

    # ---------------------------------------------------------------- detection
    @torch.no_grad()
    def detect(self, images: Sequence, chunks: Sequence[PromptChunk], merge: bool = True,
               reuse_backbone: bool = True, max_detections: Optional[int] = None, **post) -> list:
        """Detections of ``chunks`` in each image (one batch): per image a merged ``Detections`` (global phrase
        labels, top ``max_detections``; default the model's ``detections_per_img`` when chunked, 0 = all), or with
        ``merge=False`` the list of per-chunk ``Detections`` (local labels)."""
        prepared = [self.prepare(im) for im in images]
        batch, sizes = self.model.batch_images([t for t, _ in prepared])
        orig = [o for _, o in prepared]
        enc = self._encode(chunks, cache_text=reuse_backbone)
        opts = {**self.post, **post}
        per = detect_chunks(self.model, batch.to(self.device), sizes.to(self.device), orig, enc,
                            reuse_backbone=reuse_backbone, chunk_batch=self.chunk_batch, **opts)
        if not merge:
            return per
        if max_detections is None:
            max_detections = opts.get("detections_per_img", getattr(self.model.cfg, "detections_per_img", 100))
        if len(chunks) == 1:
            max_detections = None  # one chunk: exactly the model's post-processed output
        return [merge_chunk_detections(p, chunks, max_detections=max_detections or None) for p in per]

    def predict(self, image, prompt, **post) -> Prediction:
        """Detect the phrases of ``prompt`` ("a cat. a remote control", a list of names, or a ``Prompt``)."""
        return self.predict_batch([image], [prompt], **post)[0]

    def predict_batch(self, images: Sequence, prompts, batch_size: int = 4, **post) -> list:
        """``predict`` over many images; ``prompts`` is one caption/``Prompt`` for all, or a list with one prompt per
        image (class names for every image: ``[names] * len(images)``). Images of a batch are padded to a common
        size, so results can differ from one-by-one runs by float rounding near the padding."""
        if isinstance(prompts, (str, Prompt)):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise GLIPInputError(f"{len(images)} images but {len(prompts)} prompts")
        parsed = [self.as_prompt(p) for p in prompts]
        groups: dict = {}
        for i, p in enumerate(parsed):
            key = (p.caption, tuple(tuple(map(tuple, s)) for s in p.spans))
            groups.setdefault(key, []).append(i)
        out: list = [None] * len(images)
        for key, idx in groups.items():
            prompt = parsed[idx[0]]
            chunks = chunk_prompt(prompt, self.model.tokenizer, max_len=self.max_text_len)
            for s in range(0, len(idx), max(1, batch_size)):
                sub = idx[s : s + batch_size]
                pics = [to_pil(images[i]) for i in sub]
                dets = self.detect(pics, chunks, **post)
                for i, pic, d in zip(sub, pics, dets):
                    d.phrases = list(prompt.names)
                    out[i] = Prediction(detections=d, prompt=prompt, image_size=(pic.size[1], pic.size[0]))
        return out


__all__ = [
    "Predictor",
    "Prediction",
    "checkpoint_defaults",
    "pick_device",
    "resized_size",
    "to_pil",
    "load_image_record",
    "list_images",
]
