"""Prompts longer than the text limit: split into chunks, run the image backbone once, the head once per chunk.

The official LVIS protocol (reference §6, ``engine/inference.py``) runs the *whole* model once per 40-class chunk
(31 full passes per image for LVIS's 1,203 classes). The image features do not depend on the text (GLIP §3: the
image meets the text only in the head), so here the Swin+FPN features are computed once per image batch and reused
by every chunk; the text features of a chunk do not depend on the image, so they are computed once per chunk and
reused by every image. Chunks can also be packed with as many names as fit the 256-token limit instead of 40.

With the same chunks, reuse gives the same detections as one full pass per chunk (``reuse_backbone=False`` is that
reference); packing changes which names share a prompt, and the fusion lets names in one prompt influence each
other, so packed and 40-name chunks give (slightly) different scores — compare them by AP, not box by box.

Shapes: B images, C chunks in one head call, P phrases of a chunk, T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..model.prompts import (
    MAX_TEXT_LEN,
    SEPARATOR,
    Prompt,
    build_detection_prompt,
    chunk_names,
    pack_lengths,
    spans_to_token_map,
)
from ..model.types import Detections, GLIPInputError, TextInputs

OFFICIAL_CHUNK = 40  # TEST.CHUNKED_EVALUATION of the official LVIS configs


@dataclass
class PromptChunk:
    """One prompt that fits the text limit; ``index[p]`` is the global phrase index of its local phrase p.

    ``post`` overrides post-processing options for this chunk (e.g. a detection budget proportional to the
    number of names it holds).
    """

    prompt: Prompt
    index: list
    post: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.index)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def caption_tokens(tokenizer, caption: str) -> int:
    """Tokens of a caption with [CLS] and [SEP], without truncation."""
    return _n_tokens(tokenizer, caption) + 2


def chunk_class_names(names: Sequence[str], tokenizer, max_len: int = MAX_TEXT_LEN,
                      max_per_chunk: Optional[int] = None) -> list:
    """Class names → detection-prompt chunks ("a. b. c"), packed to ``max_len`` tokens (or ``max_per_chunk`` names).

    ``max_per_chunk=40`` is the official LVIS chunking (it also splits a 40-name chunk that would not fit, where
    the official code silently truncates the prompt and never detects the names past token 256).
    """
    out = []
    for idx in chunk_names(list(names), tokenizer, max_len=max_len, max_per_chunk=max_per_chunk):
        out.append(PromptChunk(build_detection_prompt([names[i] for i in idx]), list(idx)))
    return out


def chunk_prompt(prompt: Prompt, tokenizer, max_len: int = MAX_TEXT_LEN, max_per_chunk: Optional[int] = None,
                 separator: str = SEPARATOR) -> list:
    """Split a prompt whose caption exceeds ``max_len`` tokens into chunks of whole phrases.

    A prompt that fits is returned unchanged as one chunk (its caption verbatim, so the result equals the
    unchunked model). Otherwise each chunk's caption is its phrases' text joined with ``separator``; the chunk
    prompts' spans are local to their captions, and ``PromptChunk.index`` maps back to the original phrases.
    Every phrase must have one contiguous text (``phrases_from_caption`` and ``build_detection_prompt`` give that).
    """
    P = len(prompt.spans)
    if P == 0:
        raise GLIPInputError("empty prompt: no phrase to detect")
    fits = caption_tokens(tokenizer, prompt.caption) <= max_len
    if fits and (max_per_chunk is None or P <= max_per_chunk):
        return [PromptChunk(prompt, list(range(P)))]
    texts = []
    for p, spans in enumerate(prompt.spans):
        s, e = min(a for a, _ in spans), max(b for _, b in spans)
        texts.append(prompt.caption[s:e])
    sep_len = _n_tokens(tokenizer, separator.strip()) if separator.strip() else 0
    lengths = [_n_tokens(tokenizer, t) for t in texts]
    chunks = pack_lengths(lengths, sep_len, max_len, max_per_chunk, texts=texts, what="phrase")
    out = []
    for idx in chunks:
        caption, spans = "", []
        for j, p in enumerate(idx):
            if j:
                caption += separator
            spans.append([(len(caption), len(caption) + len(texts[p]))])
            caption += texts[p]
        if caption_tokens(tokenizer, caption) > max_len:  # the additive estimate failed (exotic separator)
            raise GLIPInputError(f"chunk {caption[:60]!r}... needs more than {max_len} tokens; use a '.' separator")
        out.append(PromptChunk(Prompt(caption=caption, spans=spans, names=[prompt.names[p] for p in idx]), list(idx)))
    return out


class EncodedChunks:
    """Tokens, token maps and (optionally) text features of a fixed list of chunks, computed once.

    ``cache_text=True`` encodes each chunk's text once (batch of one) and reuses it for every image; the text
    encoder sees no image, so this only changes float rounding (tests compare with a tolerance).
    """

    def __init__(self, model, chunks: Sequence[PromptChunk], cache_text: bool = True):
        if len(chunks) == 0:
            raise GLIPInputError("no prompt chunks given")
        self.chunks = list(chunks)
        self.cache_text = cache_text
        self.text, self.maps, self.features = [], [], []
        dev = model.pixel_mean.device
        for i, ch in enumerate(self.chunks):
            text, offsets = model.tokenize([ch.prompt.caption])
            T = text.length
            self.maps.append(spans_to_token_map(ch.prompt.caption, ch.prompt.spans, offsets[0], T, where=f"chunk #{i}"))
            text = text.to(dev)
            self.text.append(text)
            if cache_text:
                with torch.no_grad():
                    self.features.append(model.encode_text(text))

    def __len__(self) -> int:
        return len(self.chunks)

    def group(self, ids: Sequence[int], batch: int):
        """Text inputs (C·B, T), features or None, and token maps for chunks ``ids``, each repeated per image."""
        T = max(self.text[i].length for i in ids)
        texts = [self.text[i].pad_to(T) for i in ids]
        rep = lambda t: None if t is None else t.repeat_interleave(batch, 0)  # noqa: E731  chunk-major
        ti = TextInputs(
            input_ids=rep(torch.cat([t.input_ids for t in texts])),
            attention_mask=rep(torch.cat([t.attention_mask for t in texts])),
            token_type_ids=None if texts[0].token_type_ids is None else rep(torch.cat([t.token_type_ids for t in texts])),
        )
        feats = None
        if self.cache_text:
            padded = [torch.nn.functional.pad(self.features[i], (0, 0, 0, T - self.features[i].shape[1])) for i in ids]
            feats = rep(torch.cat(padded))
        maps = [self.maps[i] for i in ids for _ in range(batch)]
        return ti, feats, maps


@torch.no_grad()
def detect_chunks(model, images: Tensor, image_sizes: Tensor, orig_sizes: Sequence, chunks,
                  reuse_backbone: bool = True, chunk_batch: int = 1, features: Optional[list] = None,
                  **post) -> list:
    """Detections of every chunk in every image: ``out[b][c]`` (labels = the chunk's local phrase index).

    images (B,3,H,W) padded batch on the model's device, image_sizes (B,2), orig_sizes per image (h, w).
    ``chunks``: a list of ``PromptChunk`` or an ``EncodedChunks`` (reuse it across batches).
    ``reuse_backbone=False`` is the official protocol: one full forward (image and text encoders + head) per
    chunk. ``chunk_batch`` chunks share one head call (features repeated along the batch).
    ``features``: the precomputed ``model.encode_image`` of this batch (e.g. shared with other prompts).
    """
    enc = chunks if isinstance(chunks, EncodedChunks) else EncodedChunks(model, chunks, cache_text=reuse_backbone)
    B = int(images.shape[0])
    if reuse_backbone and features is None:
        features = model.encode_image(images, image_sizes)
    sizes = [tuple(map(int, s)) for s in image_sizes.tolist()]
    orig = [tuple(map(int, s)) for s in orig_sizes]
    out = [[None] * len(enc) for _ in range(B)]
    step = max(1, int(chunk_batch))
    for start in range(0, len(enc), step):
        ids = list(range(start, min(start + step, len(enc))))
        C = len(ids)
        text, feats, maps = enc.group(ids, B)
        if not reuse_backbone:
            outputs = model(images.repeat(C, 1, 1, 1), image_sizes.repeat(C, 1), text)
        else:
            fs = [f.repeat(C, 1, 1, 1) for f in features] if C > 1 else features
            outputs = model.forward_head(fs, text, text_features=feats)
        names = [enc.chunks[i].prompt.names for i in ids for _ in range(B)]
        opts = dict(post)
        per_chunk = [enc.chunks[i].post for i in ids]
        if any(per_chunk) and C > 1 and any(pc != per_chunk[0] for pc in per_chunk):
            # different budgets per chunk: post-process chunk by chunk
            dets = []
            for j, i in enumerate(ids):
                sl = slice(j * B, (j + 1) * B)
                sub = _slice_outputs(outputs, sl)
                dets += model.postprocess(sub, maps[sl], sizes, orig, phrases=names[sl], **{**opts, **per_chunk[j]})
        else:
            opts.update(per_chunk[0])
            dets = model.postprocess(outputs, maps, sizes * C, orig * C, phrases=names, **opts)
        for j, i in enumerate(ids):
            for b in range(B):
                out[b][i] = dets[j * B + b]
    return out


def _slice_outputs(o, sl):
    from dataclasses import replace

    return replace(o, logits=o.logits[sl], box_regression=o.box_regression[sl], centerness=o.centerness[sl],
                   text_mask=None if o.text_mask is None else o.text_mask[sl])


def merge_chunk_detections(per_chunk: Sequence[Detections], chunks: Sequence[PromptChunk],
                           phrases: Optional[Sequence[str]] = None, max_detections: Optional[int] = None) -> Detections:
    """Concatenate one image's chunk detections with global phrase labels, sorted by decreasing score.

    No NMS across chunks: chunks hold disjoint phrases and NMS is per phrase (as the official code).
    ``max_detections`` keeps the top-k after merging (None/0: keep all, as LVIS Fixed AP needs).
    """
    boxes, scores, labels = [], [], []
    for d, ch in zip(per_chunk, chunks):
        idx = torch.as_tensor(ch.index, dtype=torch.long, device=d.labels.device)
        boxes.append(d.boxes)
        scores.append(d.scores)
        labels.append(idx[d.labels] if len(d) else d.labels)
    boxes = torch.cat(boxes) if boxes else torch.zeros(0, 4)
    scores = torch.cat(scores) if scores else torch.zeros(0)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    order = torch.sort(scores, descending=True, stable=True).indices
    if max_detections:
        order = order[:max_detections]
    return Detections(boxes=boxes[order], scores=scores[order], labels=labels[order],
                      phrases=list(phrases) if phrases is not None else [])


__all__ = [
    "OFFICIAL_CHUNK",
    "PromptChunk",
    "EncodedChunks",
    "chunk_class_names",
    "chunk_prompt",
    "caption_tokens",
    "detect_chunks",
    "merge_chunk_detections",
]
