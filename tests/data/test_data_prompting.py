"""Stages ``prompt`` and ``tokenize``: the official detection→grounding rule, grounding phrases, positive maps."""

import random

import pytest
import torch

from glip_pl.data.prompting import CategoryTable, PromptConfig, build_prompt, tokenize_sample
from glip_pl.data.schema import Sample


def _det(cats, n_boxes=None):
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * len(cats))
    return Sample(id="d", source="s", kind="detection", image=None, width=10, height=10, boxes=boxes,
                  category_ids=list(cats))


@pytest.fixture(scope="module")
def table200(tokenizer):
    """200 one-token class names, so 85 negatives fit the 254-token budget as in O365."""
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 5)[:200]
    return CategoryTable([{"id": i + 1, "name": w} for i, w in enumerate(words)], tokenizer)


def test_sampled_prompt_follows_the_official_rule(tokenizer, table200):
    counts = []
    for seed in range(300):
        s = build_prompt(_det([5, 5, 17]), table200, random.Random(seed), PromptConfig())
        assert not s.caption.endswith(". ") and not s.caption.endswith(".")  # no trailing separator
        assert s.caption.count(". ") == len(s.phrase_labels) - 1
        assert {5, 17} <= set(s.phrase_labels) and len(set(s.phrase_labels)) == len(s.phrase_labels)
        for box, p in zip(s.category_ids, s.box_phrases.tolist()):
            assert s.phrase_labels[p] == box
            (a, b), = s.phrase_spans[p]
            assert s.caption[a:b] == table200.names[box]
        assert len(tokenizer(s.caption)["input_ids"]) <= 256
        counts.append(len(s.phrase_labels) - 2)
    full = sum(c == 85 for c in counts) / len(counts)
    assert 0.4 < full < 0.65  # all 85 negatives half the time (plus the uniform draws that hit 85 by chance)
    assert min(counts) >= 1 and len(set(counts)) > 30  # otherwise uniform in 1..85


def test_positives_beyond_the_token_budget_are_dropped_with_their_boxes(tokenizer):
    long = [{"id": i, "name": f"a very long category name number {i}"} for i in range(1, 60)]
    table = CategoryTable(long, tokenizer)
    s = build_prompt(_det(list(range(1, 60))), table, random.Random(0), PromptConfig())
    assert 10 < len(s.phrase_labels) < 59 and len(s.boxes) == len(s.category_ids) == len(s.phrase_labels)
    assert len(tokenizer(s.caption)["input_ids"]) <= 256


def test_all_mode_is_the_eval_prompt_in_id_order(tokenizer):
    table = CategoryTable([{"id": 3, "name": "cat"}, {"id": 1, "name": "traffic_light"}], tokenizer)
    s = build_prompt(_det([3]), table, random.Random(0), PromptConfig(mode="all"))
    assert s.caption == "traffic light. cat" and s.phrase_labels == [1, 3] and s.box_phrases.tolist() == [1]


def test_grounding_boxes_with_identical_spans_share_a_phrase(tokenizer):
    cap = "a man and a dog near a man"
    s = Sample(id="g", source="s", kind="grounding", image=None, width=10, height=10,
               boxes=torch.zeros(4, 4), caption=cap,
               spans=[[(0, 5)], [(10, 15)], [(0, 5)], [(21, 26), (0, 5)]])
    s = build_prompt(s, None, random.Random(0), PromptConfig())
    assert s.box_phrases.tolist() == [0, 1, 0, 2]
    assert s.phrase_names == ["a man", "a dog", "a man a man"] and s.phrase_labels == [0, 1, 2]
    s = tokenize_sample(s, tokenizer)
    toks = tokenizer.convert_ids_to_tokens(s.input_ids.tolist())
    assert s.phrase_map.shape == (3, len(toks))
    assert [t for t, m in zip(toks, s.phrase_map[1]) if m] == ["a", "dog"]
    assert [t for t, m in zip(toks, s.phrase_map[2]) if m] == ["a", "man", "a", "man"]


def test_phrases_past_truncation_are_removed_with_their_boxes(tokenizer):
    cap = "a cat " + "and more words " * 100 + "a dog"
    s = Sample(id="g", source="s", kind="grounding", image=None, width=10, height=10, boxes=torch.rand(2, 4),
               caption=cap, spans=[[(0, 5)], [(len(cap) - 5, len(cap))]])
    s = tokenize_sample(build_prompt(s, None, random.Random(0), PromptConfig()), tokenizer, max_text_len=256)
    assert s.input_ids.shape == (256,) and s.phrase_map.shape == (1, 256)
    assert len(s.boxes) == 1 and s.box_phrases.tolist() == [0] and s.extra["unmapped_phrases"] == 1
