"""Stage ``collate`` and the ``GroundingBatch`` contract with the model."""

import random

import torch
from PIL import Image

from glip_pl.data import GroundingBatch, collate
from glip_pl.data.prompting import CategoryTable, PromptConfig, build_prompt, tokenize_sample
from glip_pl.data.schema import Sample
from glip_pl.data.transforms import to_tensor
from glip_pl.model.types import Targets, TextInputs


def _samples(tokenizer):
    g = Sample(id="g", source="goldg", kind="grounding", image=Image.new("RGB", (70, 45), (9, 9, 9)), width=70,
               height=45, boxes=torch.tensor([[1.0, 2, 30, 40], [5, 5, 9, 9]]),
               caption="a cat next to a considerably longer description of a dog", spans=[[(0, 5)], [(51, 56)]],
               scores=[0.9, 0.8])
    d = Sample(id="d", source="o365", kind="detection", image=Image.new("RGB", (33, 100), (5, 5, 5)), width=33,
               height=100, boxes=torch.tensor([[0.0, 0, 3, 3]]), category_ids=[2])
    c = Sample(id="c", source="cc", kind="caption", image=Image.new("RGB", (64, 64)), width=64, height=64,
               boxes=torch.zeros(0, 4), caption="just words")
    table = CategoryTable([{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}], tokenizer)
    out = []
    for s in (g, d, c):
        s = build_prompt(s, table, random.Random(0), PromptConfig(mode="all"))
        out.append(tokenize_sample(to_tensor(s), tokenizer))
    return out


def test_collate_pads_and_types(tokenizer):
    samples = _samples(tokenizer)
    b = collate(samples)
    assert isinstance(b, GroundingBatch) and len(b) == 3
    assert b.images.dtype == torch.uint8 and b.images.shape == (3, 3, 128, 96)  # max 100x70 → multiples of 32
    assert b.image_sizes.tolist() == [[45, 70], [100, 33], [64, 64]] and b.image_sizes.dtype == torch.long
    assert b.orig_sizes.tolist() == [[45, 70], [100, 33], [64, 64]]
    assert b.images[0, :, 45:].sum() == 0 and b.images[0, :, :, 70:].sum() == 0 and b.images[0, :, :45, :70].all()
    assert b.pixel_mask[1].sum() == 100 * 33
    T = max(len(s.input_ids) for s in samples)
    assert isinstance(b.text, TextInputs) and b.text.input_ids.shape == (3, T)
    assert b.text.attention_mask.sum(1).tolist() == [len(s.input_ids) for s in samples]
    assert isinstance(b.targets, Targets) and b.targets.boxes.shape == (3, 2, 4)
    assert b.targets.valid.tolist() == [[True, True], [True, False], [False, False]]
    assert b.targets.positive_map.shape == (3, 2, T)
    for i, s in enumerate(samples):
        assert b.phrase_maps[i].shape == (len(s.phrase_names), T)
        for m, p in enumerate(b.box_phrases[i].tolist()):
            assert torch.equal(b.targets.positive_map[i, m], b.phrase_maps[i][p])
    assert b.phrase_labels[1] == [1, 2] and b.box_phrases[1].tolist() == [1]  # detection: category ids
    assert b.phrase_names[0] == ["a cat", "a dog"] and b.phrase_labels[0] == [0, 1]
    assert b.kinds == ["grounding", "detection", "caption"] and b.ids == ["g", "d", "c"]
    assert b.sources == ["goldg", "o365", "cc"] and b.meta[0]["scores"] == [0.9, 0.8]
    assert b.captions[2] == "just words" and b.phrase_maps[2].shape == (0, T)


def test_to_moves_every_tensor(tokenizer):
    b = collate(_samples(tokenizer)).to("cpu")
    assert b.text.input_ids.device.type == "cpu" and b.phrase_maps[0].device.type == "cpu"
    assert b.targets.positive_map.dtype == torch.float32
