"""Reading caption shards for the teacher: one rank's shards as batches of decoded, resized, phrase-parsed captions.

A shard is the unit of work (written by exactly one rank), so a batch never mixes shards and the last batch of a
shard says so; every sample that cannot be labelled is listed with its skip reason instead of being dropped.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import torch

from .config import LabelConfig
from .phrases import CaptionPhrases, PhraseExtractor


def input_shards(cfg: LabelConfig) -> list:
    from ..data.reader import expand_urls

    return expand_urls(cfg.input, cfg.split)


def token_char_limit(tokenizer, caption: str, max_len: int) -> int:
    """Characters of ``caption`` that fit ``max_len`` tokens ([CLS]/[SEP] included)."""
    enc = tokenizer(caption, truncation=True, max_length=max_len, return_offsets_mapping=True)
    ends = [int(e) for s, e in enc["offset_mapping"] if e > s]
    full = tokenizer(caption, truncation=False, return_length=True)["length"]
    full = full[0] if isinstance(full, list) else full
    if full <= max_len:
        return len(caption)
    return max(ends) if ends else 0


def cut_phrases(ph: CaptionPhrases, limit: int) -> CaptionPhrases:
    """Cut the caption to ``limit`` characters, dropping spans past it (and phrases left without spans)."""
    if limit >= len(ph.caption):
        return ph
    out = CaptionPhrases(caption=ph.caption[:limit], truncated=True)
    for spans, name in zip(ph.spans, ph.names):
        kept = [[s, e] for s, e in spans if e <= limit]
        if kept:
            out.spans.append(kept)
            out.names.append(name)
    return out


class CaptionShardReader(torch.utils.data.IterableDataset):
    """Batches of the input shards at positions ``todo``: each batch holds samples of one shard only; the last batch
    of a shard has ``last=True`` (possibly with no samples) and lists the samples the shard skipped with their
    reason.

    Runs spaCy, decoding and the test resize (in DataLoader workers when ``num_workers`` > 0).
    """

    def __init__(self, shards: list, todo: list, cfg: LabelConfig, tokenizer, max_text_len: int):
        super().__init__()
        self.shards, self.todo, self.cfg = shards, list(todo), cfg
        self.tokenizer, self.max_text_len = tokenizer, max_text_len
        self._extractor = None

    def extractor(self) -> PhraseExtractor:
        if self._extractor is None:
            self._extractor = PhraseExtractor(self.cfg.phrases)
        return self._extractor

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        todo = self.todo if info is None else self.todo[info.id :: info.num_workers]
        for i in todo:
            yield from self._shard(i)

    def _decode(self, raw: dict):
        """(record, image tensor, orig (h, w), None, image bytes) or (record, None, None, reason, None)."""
        from PIL import Image

        from ..data.image_io import open_rgb
        from ..eval.predictor import resized_size

        try:
            rec = json.loads(raw["json"])
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError("no id")
        except Exception:
            return {"id": raw.get("__key__")}, None, None, "bad_record", None
        cap = rec.get("caption")
        if not isinstance(cap, str):
            return rec, None, None, "non_text_caption", None
        if not cap.strip():
            return rec, None, None, "empty_caption", None
        ext = rec.get("image") or next((e for e in ("jpg", "jpeg", "png", "webp") if e in raw), None)
        try:
            img = open_rgb(raw[ext])  # upright, 8-bit: the same decoder as training and the converters
        except Exception:
            return rec, None, None, "undecodable_image", None
        W, H = img.size
        h, w = resized_size(H, W, self.cfg.min_size, self.cfg.max_size) if self.cfg.min_size else (H, W)
        if (h, w) != (H, W):
            img = img.resize((w, h), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        rec["width"], rec["height"], rec["image"] = W, H, ext
        return rec, t, (H, W), None, raw[ext]

    def _shard(self, i: int) -> Iterator[dict]:
        from ..data.reader import iter_raw

        decoded = [self._decode(raw) for raw in iter_raw(self.shards[i])]
        ok = [d for d in decoded if d[3] is None]
        phrases = iter(self.extractor()([d[0]["caption"] for d in ok]))
        items, skipped = [], []
        for rec, t, orig, reason, data in decoded:
            if reason is not None:
                skipped.append((str(rec.get("id")), reason))
                continue
            ph = next(phrases)  # its caption may be cut to phrases.max_chars already
            ph = cut_phrases(ph, token_char_limit(self.tokenizer, ph.caption, self.max_text_len))
            items.append({"rec": rec, "image": t, "image_bytes": data, "orig": orig, "caption": ph.caption,
                          "spans": ph.spans, "names": ph.names, "truncated": ph.truncated})
        bs = max(1, self.cfg.batch_size)
        batches = [items[s : s + bs] for s in range(0, len(items), bs)] or [[]]
        for b, chunk in enumerate(batches):
            last = b == len(batches) - 1
            yield {"shard": i, "items": chunk, "skipped": skipped if last else [], "last": last,
                   "n_input": len(decoded) if last else 0}


def _collate_identity(x):
    return x


def make_predict_loader(cfg: LabelConfig, shards: list, todo: list, tokenizer, max_text_len: int):
    ds = CaptionShardReader(shards, todo, cfg, tokenizer, max_text_len)
    workers = min(cfg.num_workers, len(todo))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=_collate_identity,
                                       persistent_workers=False)
