"""The prompt of a dataset's categories (zero-shot detection, GLIP §3.1 / reference §6): class names in id order,
optional ODinW name overrides and "a photo of a {}"-style templates, split into chunks of whole classes past the text
limit."""

from __future__ import annotations

from typing import Optional, Sequence

from ..model.prompts import SEPARATOR, Prompt, build_detection_prompt, clean_name
from .chunked import PromptChunk, caption_tokens
from .detections import CocoEvalError, load_json


def category_prompt_names(gt, override: Optional[dict] = None, template: Optional[dict] = None) -> tuple:
    """(category ids in ``getCatIds`` order, prompt names) of a COCO-format ground truth.

    ``override``: {category id or original name: name to use in the prompt} (ODinW ``OVERRIDE_CATEGORY``);
    ``template``: {category id or name: "prefix {} suffix"}-style strings — only the name part is a phrase span.
    """
    data = gt.dataset if hasattr(gt, "dataset") else load_json(gt, "ground truth")
    cats = sorted(data.get("categories", []), key=lambda c: c["id"])
    ids, names = [], []
    for c in cats:
        name = c["name"]
        if override:
            name = override.get(c["id"], override.get(str(c["id"]), override.get(c["name"], name)))
        ids.append(int(c["id"]))
        names.append(name)
    return ids, names


def templated_prompt(names: Sequence[str], templates: Optional[Sequence[Optional[str]]] = None):
    """A detection prompt where class p reads ``templates[p].format(name)``; only the name is the phrase span.

    E.g. ``"a photo of a {}"``; the paper's prompt-tuning section writes class descriptions this way.
    """
    if templates is None:
        return build_detection_prompt(list(names))
    caption, spans, shown = "", [], []
    for i, (n, t) in enumerate(zip(names, templates)):
        n = clean_name(n)
        t = t or "{}"
        if t.count("{}") != 1:
            raise CocoEvalError(f"template #{i} ({t!r}) must contain exactly one '{{}}' for the class name")
        pre, post = t.split("{}")
        if i:
            caption += SEPARATOR
        caption += pre
        spans.append([(len(caption), len(caption) + len(n))])
        caption += n + post
        shown.append(n)
    return Prompt(caption=caption, spans=spans, names=shown)


def templated_chunks(names: Sequence[str], templates: Optional[Sequence[Optional[str]]], tokenizer,
                     max_len: int = 256) -> list:
    """``templated_prompt`` split into chunks of whole classes (template words travel with their class) that
    fit ``max_len`` tokens; one chunk, the prompt verbatim, when it fits."""
    templates = list(templates) if templates is not None else [None] * len(names)
    whole = templated_prompt(names, templates if any(templates) else None)
    if caption_tokens(tokenizer, whole.caption) <= max_len:
        return [PromptChunk(whole, list(range(len(names))))]
    sep = len(tokenizer(SEPARATOR.strip(), add_special_tokens=False)["input_ids"])
    lengths = [len(tokenizer((t or "{}").replace("{}", clean_name(n)), add_special_tokens=False)["input_ids"])
               for n, t in zip(names, templates)]
    groups, cur, used = [], [], 2
    for i, n_tok in enumerate(lengths):
        if n_tok + 2 > max_len:
            raise CocoEvalError(f"class #{i} ({names[i]!r}) alone needs {n_tok + 2} > {max_len} tokens")
        if cur and used + sep + n_tok > max_len:
            groups.append(cur)
            cur, used = [], 2
        used += n_tok + (sep if cur else 0)
        cur.append(i)
    groups.append(cur)
    return [PromptChunk(templated_prompt([names[i] for i in g], [templates[i] for i in g]), g) for g in groups]


__all__ = ["category_prompt_names", "templated_prompt", "templated_chunks"]
