"""Prompts and positive maps: class names → caption with spans, character spans → token maps.

Follows the official rules (reference §3), except that a span maps to tokens by character overlap: the official
``create_positive_map`` retries start+1/+2 and silently skips a span that still maps to nothing; here spans may
start or end inside a word, and a span that covers no token is an error that names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .types import GLIPInputError

SEPARATOR = ". "
MAX_TEXT_LEN = 256  # MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN


def clean_name(name: str) -> str:
    """The official class-name cleaning."""
    name = re.sub(r"\(.*\)", "", name)
    name = name.replace("_", " ")
    name = name.replace("  ", " ")
    return name


@dataclass
class Prompt:
    """A caption and the character spans of its phrases; ``spans[p]`` is a list of [start, end) pairs."""

    caption: str
    spans: list  # list[list[tuple[int, int]]], one entry per phrase
    names: list  # phrase text per phrase (for display)

    def __len__(self) -> int:
        return len(self.spans)


def build_detection_prompt(names: Sequence[str], separator: str = SEPARATOR, clean: bool = True) -> Prompt:
    """Join class names into one caption ("person. bicycle. car") with each class's character span."""
    if len(names) == 0:
        raise GLIPInputError("empty prompt: no class names given")
    parts, spans, caption = [], [], ""
    for i, raw in enumerate(names):
        name = clean_name(raw) if clean else raw
        if not name.strip():
            raise GLIPInputError(f"class name #{i} ({raw!r}) is empty after cleaning")
        if i:
            caption += separator
        start = len(caption)
        caption += name
        spans.append([(start, len(caption))])
        parts.append(name)
    return Prompt(caption=caption, spans=spans, names=parts)


def phrases_from_caption(caption: str, separator: str = ".") -> Prompt:
    """Split a user prompt such as "a cat. a remote control" into phrases at ``separator``."""
    if not caption or not caption.strip():
        raise GLIPInputError("empty prompt: the caption has no text")
    spans, names = [], []
    pos = 0
    for piece in caption.split(separator):
        start = pos + (len(piece) - len(piece.lstrip()))
        end = pos + len(piece.rstrip())
        if end > start:
            spans.append([(start, end)])
            names.append(caption[start:end])
        pos += len(piece) + len(separator)
    if not spans:
        raise GLIPInputError(f"empty prompt: no phrase in {caption!r}")
    return Prompt(caption=caption, spans=spans, names=names)


def validate_spans(caption: str, spans: Iterable, where: str = "prompt") -> None:
    n = len(caption)
    for p, phrase_spans in enumerate(spans):
        for s, e in phrase_spans:
            if not (0 <= s < e <= n):
                raise GLIPInputError(
                    f"{where}: span #{p} ({s}, {e}) is outside the caption of {n} characters: {caption!r}"
                )


def spans_to_token_map(
    caption: str,
    spans: Sequence,
    offsets: Sequence,
    num_tokens: int,
    where: str = "prompt",
) -> Tensor:
    """Binary (P, num_tokens) map: phrase p → the tokens whose characters (``offset_mapping``) overlap its spans."""
    validate_spans(caption, spans, where)
    out = torch.zeros(len(spans), num_tokens)
    tok = [(int(a), int(b)) for a, b in offsets[:num_tokens]]
    for p, phrase_spans in enumerate(spans):
        for s, e in phrase_spans:
            hit = False
            for t, (a, b) in enumerate(tok):
                if b > a and a < e and b > s:
                    out[p, t] = 1.0
                    hit = True
            if not hit:
                raise GLIPInputError(
                    f"{where}: span #{p} ({s}, {e}) = {caption[s:e]!r} maps to no token "
                    f"(caption truncated to {num_tokens} tokens or span is only whitespace/punctuation)"
                )
    return out


def chunk_names(names: Sequence[str], tokenizer, max_len: int = MAX_TEXT_LEN, max_per_chunk: int | None = None,
                separator: str = SEPARATOR) -> list:
    """Indices of ``names`` in consecutive chunks whose prompts fit ``max_len`` tokens (official LVIS: at most 40)."""
    if len(names) == 0:
        raise GLIPInputError("empty prompt: no class names given")
    sep_len = len(tokenizer(separator.strip(), add_special_tokens=False)["input_ids"])
    lengths = [len(tokenizer(clean_name(n), add_special_tokens=False)["input_ids"]) for n in names]
    return pack_lengths(lengths, sep_len, max_len, max_per_chunk, texts=list(names), what="class name")


def pack_lengths(lengths: Sequence[int], sep_len: int, max_len: int = MAX_TEXT_LEN,
                 max_per_chunk: int | None = None, texts: Sequence[str] | None = None,
                 what: str = "phrase") -> list:
    """Greedy packing of items of ``lengths`` tokens (without [CLS]/[SEP]) into chunks of at most ``max_len``."""
    chunks, cur, used = [], [], 2  # [CLS] and [SEP]
    for i, n_tok in enumerate(lengths):
        if n_tok + 2 > max_len:
            name = f" ({texts[i]!r})" if texts is not None else ""
            raise GLIPInputError(f"{what} #{i}{name} alone needs {n_tok + 2} > {max_len} tokens")
        need = n_tok + (sep_len if cur else 0)
        if cur and (used + need > max_len or (max_per_chunk is not None and len(cur) >= max_per_chunk)):
            chunks.append(cur)
            cur, used, need = [], 2, n_tok
        cur.append(i)
        used += need
    if cur:
        chunks.append(cur)
    return chunks
