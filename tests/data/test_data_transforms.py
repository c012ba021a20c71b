"""Stage ``transform``: official resize sizes, box round trips within a pixel, flip with left/right swap."""

import random

import torch
from PIL import Image

from glip_pl.data.prompting import build_prompt, PromptConfig
from glip_pl.data.schema import Sample
from glip_pl.data.transforms import TransformConfig, apply_transforms, hflip, resize, swap_left_right, target_size
from glip_pl.data.transforms import to_tensor


def test_target_size_follows_the_official_rule():
    assert target_size(640, 480, 800, 1333) == (1066, 800)
    assert target_size(480, 640, 800, 1333) == (800, 1066)
    assert target_size(2000, 500, 800, 1333) == (1332, 333)  # long side capped (int() as the official)
    assert target_size(800, 600, 600, 1333) == (800, 600)


def test_resized_boxes_map_back_within_one_pixel():
    g = torch.Generator().manual_seed(0)
    for w, h in [(640, 480), (333, 517), (1000, 250)]:
        xy = torch.rand(20, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(20, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 1
        boxes = torch.cat([xy, xy + wh], 1)
        s = Sample(id="x", source="s", kind="detection", image=Image.new("RGB", (w, h)), width=w, height=h,
                   boxes=boxes.clone())
        s = resize(s, 480, 800)
        nh, nw = s.image_size
        back = s.boxes * torch.tensor([w / nw, h / nh, w / nw, h / nh])
        assert (back - boxes).abs().max() < 1.0


def test_swap_left_right_moves_spans():
    cap = "the Left cup, right of a leftmost plate; RIGHT"
    spans = [[(4, 12)], [(14, 19), (23, 39)], [(41, 46)]]
    new, moved = swap_left_right(cap, spans)
    assert new == "the Right cup, left of a rightmost plate; LEFT"
    assert [[new[a:b] for a, b in sp] for sp in moved] == [["Right cup"], ["left", "a rightmost plate"], ["LEFT"]]
    assert swap_left_right("no sides", [[(0, 2)]]) == ("no sides", [[(0, 2)]])
    assert swap_left_right("leftover rights", [])[0] == "leftover rights"  # whole words only


def _grounding(cap, spans, boxes, w=100, h=50):
    s = Sample(id="g", source="s", kind="grounding", image=Image.new("RGB", (w, h)), width=w, height=h,
               boxes=torch.tensor(boxes, dtype=torch.float32), caption=cap, spans=spans)
    return build_prompt(s, None, random.Random(0), PromptConfig())


def test_flip_swaps_words_and_keeps_spans_and_relations_true():
    cap = "a red circle left of a blue square"
    s = _grounding(cap, [[(2, 12)], [(23, 34)]], [[0, 0, 20, 20], [60, 10, 90, 40]])
    s = hflip(to_tensor(s))
    assert s.caption == "a red circle right of a blue square"
    assert s.phrase_names == ["red circle", "blue square"] and s.spans == [[(2, 12)], [(24, 35)]]
    assert s.boxes.tolist() == [[80, 0, 100, 20], [10, 10, 40, 40]]  # circle is now right of the square
    assert hflip(s).caption == cap


def test_detection_prompts_are_never_swapped():
    s = Sample(id="d", source="s", kind="detection", image=torch.zeros(3, 4, 6, dtype=torch.uint8), width=6,
               height=4, boxes=torch.tensor([[1.0, 0, 2, 1]]), caption="left hand. right hand",
               phrase_spans=[[(0, 9)], [(11, 21)]])
    assert hflip(s).caption == "left hand. right hand" and s.boxes.tolist() == [[4.0, 0, 5, 1]]


def test_apply_transforms_gives_uint8_chw_and_is_seeded():
    cfg = TransformConfig.tiny()
    outs = []
    for _ in range(2):
        s = _grounding("a cup left of a plate", [[(0, 5)], [(14, 21)]], [[0, 0, 20, 20], [60, 10, 90, 40]])
        outs.append(apply_transforms(s, random.Random(3), cfg))
    a, b = outs
    assert a.image.dtype == torch.uint8 and a.image.shape[0] == 3 and a.image_size == tuple(a.image.shape[1:])
    assert min(a.image_size) in cfg.min_sizes and torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes)


def test_flipped_synthetic_batches_keep_captions_true(synthetic_shards, tokenizer):
    """Through the whole pipeline with flip_prob=1: every relation in a flipped caption holds for its boxes."""
    import re

    from glip_pl.data import SourceSpec, build_loader

    cfg = TransformConfig(min_sizes=(256,), max_size=512, flip_prob=1.0)
    loader = build_loader([SourceSpec(f"{synthetic_shards}/grounding", split="val")], tokenizer, 8, train=False,
                          transforms=cfg)
    checked = 0
    for b in loader:
        for i, cap in enumerate(b.captions):
            if re.search(r"\b(left|right)\b", cap):
                assert b.meta[i]["flipped_words"]
            boxes = b.targets.boxes[i][b.targets.valid[i]]
            centre = {}
            for m, p in enumerate(b.box_phrases[i].tolist()):
                centre[b.phrase_names[i][p]] = ((boxes[m, 0] + boxes[m, 2]) / 2).item()
            for a, rel, c in re.findall(r"a (\w+ \w+) (left of|right of) a (\w+ \w+)", cap):
                assert (centre[a] < centre[c]) == (rel == "left of"), cap
                checked += 1
    assert checked > 5


def test_swap_keeps_every_word_aligned_span_on_its_words():
    """Property: for any caption of words (some left/right) and word-aligned spans, a span's new text is its old
    text with left/right swapped."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    words = st.sampled_from(["a", "cup", "left", "Right", "of", "leftmost", "rightmost", "the", "LEFT", "leftover"])

    @settings(max_examples=200, deadline=None)
    @given(st.lists(words, min_size=1, max_size=12), st.data())
    def check(ws, data):
        caption = " ".join(ws)
        starts = [sum(len(w) + 1 for w in ws[:i]) for i in range(len(ws))]
        i = data.draw(st.integers(0, len(ws) - 1))
        j = data.draw(st.integers(i, len(ws) - 1))
        span = (starts[i], starts[j] + len(ws[j]))
        new, ((moved,),) = swap_left_right(caption, [[span]])
        swapped = " ".join(swap_left_right(w, [])[0] for w in ws[i:j + 1])
        assert new[moved[0]:moved[1]] == swapped

    check()


def test_ignore_regions_follow_resize_and_flip(tokenizer):
    from glip_pl.data import collate
    from glip_pl.data.prompting import tokenize_sample

    cap = "a red circle left of a blue square"
    s = _grounding(cap, [[(2, 12)]], [[0, 0, 20, 20]])
    s.ignore_boxes, s.ignore_spans = torch.tensor([[50.0, 0, 100, 50]]), [[(23, 34)]]
    s = resize(s, 100, 400)  # 100x50 → 200x100
    assert s.ignore_boxes.tolist() == [[100, 0, 200, 100]] and s.boxes.tolist() == [[0, 0, 40, 40]]
    s = hflip(to_tensor(s))
    assert s.caption == "a red circle right of a blue square"
    assert s.ignore_boxes.tolist() == [[0, 0, 100, 100]] and s.ignore_spans == [[(24, 35)]]
    assert s.caption[24:35] == "blue square"
    s = tokenize_sample(s, tokenizer)
    ids = s.input_ids.tolist()
    marked = [tokenizer.convert_ids_to_tokens(ids[t]) for t in torch.nonzero(s.ignore_map[0]).flatten().tolist()]
    assert marked == ["blue", "square"]
    other = tokenize_sample(to_tensor(_grounding("one dog", [[(4, 7)]], [[1, 1, 5, 5]])), tokenizer)
    b = collate([other, s])
    T = b.text.input_ids.shape[1]
    assert b.targets.ignore_boxes.shape == (2, 1, 4) and b.targets.ignore_map.shape == (2, 1, T)
    assert b.targets.ignore_valid.tolist() == [[False], [True]]
    assert torch.equal(b.targets.ignore_map[1, 0, : s.ignore_map.shape[1]], s.ignore_map[0])
    moved = b.to("cpu").targets.to(dtype=torch.float64)  # every optional field travels with the batch
    assert moved.ignore_boxes.dtype == moved.ignore_map.dtype == torch.float64 and moved.ignore_valid.dtype == torch.bool
    plain = collate([other])
    assert plain.targets.ignore_boxes is None and plain.targets.ignore_map is None


def test_ignore_regions_past_the_token_limit_are_dropped_and_counted(tokenizer):
    from glip_pl.data.prompting import tokenize_sample

    s = _grounding("a cat and then, much later on, a dog", [[(2, 5)]], [[0, 0, 20, 20]])
    s.ignore_boxes, s.ignore_spans = torch.tensor([[1.0, 1, 9, 9], [2.0, 2, 8, 8]]), [[(2, 5)], [(33, 36)]]
    s = tokenize_sample(to_tensor(s), tokenizer, max_text_len=6)
    assert s.ignore_boxes.tolist() == [[1, 1, 9, 9]] and s.ignore_spans == [[(2, 5)]]
    assert s.ignore_map.shape == (1, len(s.input_ids)) and s.extra["unmapped_ignore_regions"] == 1
