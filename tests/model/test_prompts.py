"""Prompt tools: class names → caption + spans, spans → token maps, chunking (reference §3)."""

import pytest
import torch

from glip_pl.model.language import tokenize
from glip_pl.model.prompts import (
    build_detection_prompt,
    chunk_names,
    clean_name,
    phrases_from_caption,
    spans_to_token_map,
)
from glip_pl.model.types import GLIPInputError

COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
    "suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).split()


def test_clean_name_follows_official_rule():
    assert clean_name("bow_(weapon)") == "bow "
    assert clean_name("traffic_light") == "traffic light"


def test_detection_prompt_spans_and_coco_token_count(tokenizer):
    p = build_detection_prompt(["person", "bicycle", "car"])
    assert p.caption == "person. bicycle. car"  # no trailing separator
    assert [p.caption[s:e] for [(s, e)] in p.spans] == ["person", "bicycle", "car"]
    coco = build_detection_prompt(COCO_NAMES)
    ids = tokenizer(coco.caption)["input_ids"]
    assert len(ids) == 194  # reference §3.3, measured with the bert-base-uncased vocabulary


def test_token_map_handles_spans_inside_words(tokenizer):
    caption = "a skateboarder jumps"
    text, offsets = tokenize(tokenizer, [caption])
    T = text.length
    # "skate" starts at the word start but ends inside the word "skateboarder"
    m = spans_to_token_map(caption, [[(2, 7)], [(4, 14)], [(15, 20)]], offsets[0], T)
    toks = tokenizer.convert_ids_to_tokens(text.input_ids[0])
    hit = lambda row: [toks[i] for i in row.nonzero().flatten().tolist()]  # noqa: E731
    assert hit(m[0]) and hit(m[0])[0].startswith("skate")
    assert hit(m[1]) == hit(m[0]) or set(hit(m[0])) <= set(hit(m[1]))  # mid-word start still covers the word-piece
    assert hit(m[2]) == ["jumps"]
    assert m[:, 0].sum() == 0 and m[:, -1].sum() == 0  # never [CLS]/[SEP]


def test_span_errors_name_the_span(tokenizer):
    caption = "a red circle"
    text, offsets = tokenize(tokenizer, [caption])
    with pytest.raises(GLIPInputError, match=r"span #0 \(5, 40\) is outside"):
        spans_to_token_map(caption, [[(5, 40)]], offsets[0], text.length)
    with pytest.raises(GLIPInputError, match="maps to no token"):
        spans_to_token_map("a red  circle", [[(5, 6)]], tokenize(tokenizer, ["a red  circle"])[1][0], 6)


def test_empty_prompts_are_errors(tokenizer):
    with pytest.raises(GLIPInputError, match="empty prompt"):
        build_detection_prompt([])
    with pytest.raises(GLIPInputError, match="empty prompt"):
        phrases_from_caption("  ")
    with pytest.raises(GLIPInputError, match="empty or not text"):
        tokenize(tokenizer, [""])


def test_user_caption_phrases():
    p = phrases_from_caption("a cat. a remote control")
    assert p.names == ["a cat", "a remote control"]
    assert [p.caption[s:e] for [(s, e)] in p.spans] == p.names


def test_chunking_fits_limit_and_packs(tokenizer):
    names = [f"thing{i}" for i in range(300)]
    chunks = chunk_names(names, tokenizer, max_len=64)
    assert [i for c in chunks for i in c] == list(range(300))
    for c in chunks:
        cap = build_detection_prompt([names[i] for i in c]).caption
        assert len(tokenizer(cap)["input_ids"]) <= 64
    # packed: adding the next name to any chunk but the last would overflow
    for c, nxt in zip(chunks[:-1], chunks[1:]):
        cap = build_detection_prompt([names[i] for i in c + [nxt[0]]]).caption
        assert len(tokenizer(cap)["input_ids"]) > 64
    assert all(len(c) <= 40 for c in chunk_names(names, tokenizer, max_per_chunk=40))


def test_tokenize_pads_to_longest_or_fixed(tokenizer):
    text, _ = tokenize(tokenizer, ["a cat", "a very long prompt about a remote control"])
    assert text.length == len(tokenizer("a very long prompt about a remote control")["input_ids"])
    fixed, _ = tokenize(tokenizer, ["a cat"], pad_to=256)
    assert fixed.length == 256 and int(fixed.attention_mask.sum()) == 4
    padded = text.pad_to(256)
    assert torch.equal(padded.input_ids[0], fixed.input_ids[0])
    assert torch.equal(padded.attention_mask[0], fixed.attention_mask[0])
