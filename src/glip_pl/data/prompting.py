"""Pipeline stages ``prompt`` (sample → caption + phrases) and ``tokenize`` (caption → tokens + phrase maps).

Detection samples become grounding prompts as GLIP trains them (reference §3.1, ``od_to_grounding.py``): shuffled
positives while they fit 254 tokens (boxes of dropped classes are removed), then sampled negatives while the budget
stays positive, all shuffled. The official code can draw "__background__" (id 0) as a negative (inferred, §3.1);
that is off by default here (``include_background``). Boxes with identical span sets share one phrase (§3.2).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch

from glip_pl.model.language import tokenize
from glip_pl.model.prompts import MAX_TEXT_LEN, SEPARATOR, build_detection_prompt, clean_name, spans_to_token_map
from glip_pl.model.types import GLIPInputError

from .schema import Sample


@dataclass
class PromptConfig:
    mode: str = "sampled"  # detection prompts: "sampled" (training, §3.1) or "all" (every class in id order, §3.3)
    num_negatives: int = 85  # RANDOM_SAMPLE_NEG
    all_negatives_prob: float = 0.5  # CONTROL_PROB[2]
    max_text_len: int = MAX_TEXT_LEN
    include_background: bool = False
    separator: str = SEPARATOR


class CategoryTable:
    """A source's categories with each one's token cost, computed once."""

    def __init__(self, categories: list, tokenizer, separator: str = SEPARATOR):
        self.names = {int(c["id"]): c["name"] for c in categories}
        self.ids = sorted(self.names)
        self.names.setdefault(0, "background")
        self.cost = {cid: len(tokenizer(clean_name(n) + separator, add_special_tokens=False)["input_ids"])
                     for cid, n in self.names.items()}


def detection_prompt(sample: Sample, table: CategoryTable, rng: random.Random, cfg: PromptConfig) -> Sample:
    if not table.ids:
        raise GLIPInputError(f"sample {sample.id}: detection source {sample.source!r} has no categories")
    cats = [int(c) for c in (sample.category_ids or [])]
    unknown = sorted(set(cats) - set(table.ids))
    if unknown:
        raise GLIPInputError(f"sample {sample.id}: category ids {unknown} are not in the source's categories")
    budget = cfg.max_text_len - 2  # [CLS] and [SEP]
    if cfg.mode == "all":
        order = list(table.ids)
    elif cfg.mode == "sampled":
        positives = sorted(set(cats))
        rng.shuffle(positives)
        kept, used = [], 0
        for c in positives:
            if used + table.cost[c] > budget:
                break
            kept.append(c)
            used += table.cost[c]
        pool = [c for c in table.ids if c not in set(positives)]
        if cfg.include_background and 0 not in table.ids:
            pool.append(0)
        k = cfg.num_negatives if rng.random() < cfg.all_negatives_prob else rng.randint(1, cfg.num_negatives)
        negatives, left = [], budget - used
        for c in rng.sample(pool, min(k, len(pool))):
            if left - table.cost[c] <= 0:
                break
            negatives.append(c)
            left -= table.cost[c]
        order = kept + negatives
        rng.shuffle(order)
    else:
        raise ValueError(f"prompt mode must be 'sampled' or 'all', got {cfg.mode!r}")
    keep = torch.tensor([c in set(order) for c in cats], dtype=torch.bool)
    if not bool(keep.all()):  # boxes of positive classes that did not fit the token budget
        sample.boxes = sample.boxes[keep]
        cats = [c for c, k in zip(cats, keep.tolist()) if k]
    prompt = build_detection_prompt([table.names[c] for c in order], separator=cfg.separator)
    pos = {c: i for i, c in enumerate(order)}
    sample.category_ids = cats
    sample.caption = prompt.caption
    sample.phrase_spans = [list(s) for s in prompt.spans]
    sample.phrase_names = list(prompt.names)
    sample.phrase_labels = list(order)
    sample.box_phrases = torch.tensor([pos[c] for c in cats], dtype=torch.long)
    return sample


def grounding_prompt(sample: Sample) -> Sample:
    phrases, box_phrases = {}, []
    for spans in sample.spans or []:
        key = tuple(sorted((int(s), int(e)) for s, e in spans))
        box_phrases.append(phrases.setdefault(key, len(phrases)))
    sample.phrase_spans = [list(k) for k in phrases]
    sample.phrase_labels = list(range(len(phrases)))
    sample.box_phrases = torch.tensor(box_phrases, dtype=torch.long)
    sample.phrase_names = phrase_texts(sample.caption, sample.phrase_spans)
    return sample


def phrase_texts(caption: str, phrase_spans: list) -> list:
    return [" ".join(caption[s:e] for s, e in spans) for spans in phrase_spans]


def build_prompt(sample: Sample, table: Optional[CategoryTable], rng: random.Random, cfg: PromptConfig) -> Sample:
    """Stage ``prompt``."""
    if sample.kind == "detection":
        return detection_prompt(sample, table, rng, cfg)
    if not sample.caption:
        raise GLIPInputError(f"sample {sample.id}: {sample.kind} sample without a caption")
    return grounding_prompt(sample)


def tokenize_sample(sample: Sample, tokenizer, max_text_len: int = MAX_TEXT_LEN) -> Sample:
    """Stage ``tokenize``. A phrase that maps to no token (truncated, or only punctuation) is removed with its boxes
    and counted in ``sample.extra["unmapped_phrases"]``."""
    text, offsets = tokenize(tokenizer, [sample.caption], max_length=max_text_len)
    ids = text.input_ids[0]
    T = int(ids.shape[0])
    where = f"sample {sample.id}"
    pmap, keep = _mappable_rows(sample.caption, list(sample.phrase_spans or []), offsets[0], T, where)
    P = len(sample.phrase_spans or [])
    if len(keep) < P:
        remap = torch.full((P,), -1, dtype=torch.long)
        remap[torch.tensor(keep, dtype=torch.long)] = torch.arange(len(keep))
        new = remap[sample.box_phrases] if len(sample.box_phrases) else sample.box_phrases
        box_keep = new >= 0
        sample.boxes, sample.box_phrases = sample.boxes[box_keep], new[box_keep]
        if sample.category_ids is not None and len(sample.category_ids) == len(box_keep):
            sample.category_ids = [c for c, k in zip(sample.category_ids, box_keep.tolist()) if k]
        sample.phrase_spans = [sample.phrase_spans[p] for p in keep]
        sample.phrase_names = [sample.phrase_names[p] for p in keep]
        sample.phrase_labels = [sample.phrase_labels[p] for p in keep]
        sample.extra = dict(sample.extra, unmapped_phrases=P - len(keep))
    if sample.ignore_spans is not None:
        sample.ignore_boxes, sample.ignore_map = _ignore_token_map(sample, offsets[0], T, where)
    sample.input_ids = ids
    sample.phrase_map = pmap
    return sample


def _mappable_rows(caption: str, span_lists: list, offsets, T: int, where: str) -> tuple:
    """((K', T) token map, kept indices) of the span lists that map to at least one token."""
    try:  # one call for all of them (the usual case)
        return spans_to_token_map(caption, span_lists, offsets, T, where=where), list(range(len(span_lists)))
    except GLIPInputError:
        rows, keep = [], []
        for k, spans in enumerate(span_lists):
            try:
                rows.append(spans_to_token_map(caption, [spans], offsets, T, where=where))
                keep.append(k)
            except GLIPInputError:
                continue
        return (torch.cat(rows) if rows else torch.zeros(0, T)), keep


def _ignore_token_map(sample: Sample, offsets, T: int, where: str) -> tuple:
    """(ignore boxes, (K, T) token map); an unmappable region is removed and counted."""
    boxes = sample.ignore_boxes if sample.ignore_boxes is not None else torch.zeros(0, 4)
    if len(boxes) != len(sample.ignore_spans):
        raise GLIPInputError(f"{where}: {len(boxes)} ignore boxes but {len(sample.ignore_spans)} ignore span lists")
    imap, keep = _mappable_rows(sample.caption, list(sample.ignore_spans), offsets, T, where)
    if len(keep) < len(boxes):
        sample.extra = dict(sample.extra, unmapped_ignore_regions=len(boxes) - len(keep))
        sample.ignore_spans = [sample.ignore_spans[k] for k in keep]
    return boxes[torch.tensor(keep, dtype=torch.long)] if len(keep) < len(boxes) else boxes, imap
