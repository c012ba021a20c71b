"""Chunked prompts: equal to one prompt when the names fit; backbone reuse equals one full pass per chunk."""

import pytest
import torch

from glip_pl.eval.chunked import (
    EncodedChunks,
    caption_tokens,
    chunk_class_names,
    chunk_prompt,
    detect_chunks,
    merge_chunk_detections,
)
from glip_pl.eval.lvis import lvis_chunks
from glip_pl.model.prompts import phrases_from_caption
from glip_pl.model.types import GLIPInputError

NAMES = ["person", "bicycle", "traffic light", "fire hydrant", "remote control", "teddy bear", "hair drier", "cat",
         "aerosol_can", "bat_(animal)", "baseball glove", "toothbrush"]
POST = dict(score_thresh=0.0, detections_per_img=50)


@pytest.fixture(scope="module")
def model():
    from glip_pl.model import build_glip

    torch.manual_seed(0)
    return build_glip("tiny").eval()


@pytest.fixture(scope="module")
def images(model):
    g = torch.Generator().manual_seed(1)
    ims = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g),
           torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=g)]
    return model.batch_images(ims)


def _same(a, b, exact=True):
    assert torch.equal(a.labels, b.labels)
    if exact:
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
    else:
        torch.testing.assert_close(a.boxes, b.boxes, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)


def test_one_chunk_equals_unchunked(model, images):
    batch, sizes = images
    chunks = chunk_class_names(NAMES, model.tokenizer)
    assert len(chunks) == 1
    ref = model.predict(list(_unbatch(batch, sizes)), [NAMES, NAMES], **POST)
    for reuse in (False, True):
        per = detect_chunks(model, batch, sizes, sizes.tolist(), chunks, reuse_backbone=reuse, **POST)
        for b in range(2):
            merged = merge_chunk_detections(per[b], chunks)
            assert len(merged) > 0
            _same(merged, ref[b], exact=not reuse)  # reuse caches the text features: float rounding only


def _unbatch(batch, sizes):
    for im, (h, w) in zip(batch, sizes.tolist()):
        yield im[:, :h, :w]


@pytest.mark.parametrize("max_per_chunk", [3, 5])
def test_backbone_reuse_equals_full_pass_per_chunk(model, images, max_per_chunk):
    batch, sizes = images
    chunks = chunk_class_names(NAMES, model.tokenizer, max_per_chunk=max_per_chunk)
    assert len(chunks) > 2
    ref = detect_chunks(model, batch, sizes, sizes.tolist(), chunks, reuse_backbone=False, **POST)
    # same text path (no text cache), one chunk per head call: bit-for-bit the official per-chunk result
    exact = detect_chunks(model, batch, sizes, sizes.tolist(), EncodedChunks(model, chunks, cache_text=False), **POST)
    # cached text features and 3 chunks per head call: equal up to float rounding
    fast = detect_chunks(model, batch, sizes, sizes.tolist(), chunks, chunk_batch=3, **POST)
    for b in range(2):
        for c in range(len(chunks)):
            assert len(ref[b][c]) > 0
            _same(exact[b][c], ref[b][c], exact=True)
            _same(fast[b][c], ref[b][c], exact=False)


def test_backbone_runs_once_per_batch(model, images, monkeypatch):
    batch, sizes = images
    chunks = chunk_class_names(NAMES, model.tokenizer, max_per_chunk=4)
    calls = {"image": 0, "text": 0}
    enc_img, enc_txt = model.encode_image, model.encode_text

    def count_img(*a, **k):
        calls["image"] += 1
        return enc_img(*a, **k)

    def count_txt(*a, **k):
        calls["text"] += 1
        return enc_txt(*a, **k)

    monkeypatch.setattr(model, "encode_image", count_img)
    monkeypatch.setattr(model, "encode_text", count_txt)
    enc = EncodedChunks(model, chunks)
    detect_chunks(model, batch, sizes, sizes.tolist(), enc, **POST)
    detect_chunks(model, batch, sizes, sizes.tolist(), enc, **POST)
    assert calls == {"image": 2, "text": len(chunks)}  # once per batch; text once per chunk for the whole run
    calls.update(image=0, text=0)
    detect_chunks(model, batch, sizes, sizes.tolist(), chunks, reuse_backbone=False, **POST)
    assert calls == {"image": len(chunks), "text": len(chunks)}  # the official protocol


def test_merge_maps_labels_to_global_names(model, images):
    batch, sizes = images
    chunks = chunk_class_names(NAMES, model.tokenizer, max_per_chunk=5)
    per = detect_chunks(model, batch, sizes, sizes.tolist(), chunks, **POST)
    merged = merge_chunk_detections(per[0], chunks, phrases=NAMES)
    assert len(merged) == sum(len(d) for d in per[0])
    assert (merged.scores[:-1] >= merged.scores[1:]).all()
    local = {(c, float(s)) for c, d in enumerate(per[0]) for s, l in zip(d.scores, d.labels) if chunks[c].index[l] == 6}
    assert {float(s) for s, l in zip(merged.scores, merged.labels) if l == 6} == {s for _, s in local}
    assert len(merge_chunk_detections(per[0], chunks, max_detections=7)) == 7


def test_chunk_prompt_splits_long_captions_and_keeps_spans(model):
    tok = model.tokenizer
    caption = ". ".join(f"a small red object number {i}" for i in range(60))
    prompt = phrases_from_caption(caption)
    assert caption_tokens(tok, caption) > 256
    chunks = chunk_prompt(prompt, tok, max_len=256)
    assert len(chunks) >= 2
    assert sorted(i for ch in chunks for i in ch.index) == list(range(60))
    for ch in chunks:
        assert caption_tokens(tok, ch.prompt.caption) <= 256
        for local, glob in enumerate(ch.index):
            (s, e), = ch.prompt.spans[local]
            (S, E), = prompt.spans[glob]
            assert ch.prompt.caption[s:e] == caption[S:E]
    short = phrases_from_caption("a cat. a remote control")
    (only,) = chunk_prompt(short, tok)
    assert only.prompt is short and only.index == [0, 1]  # a prompt that fits is used verbatim
    with pytest.raises(GLIPInputError, match="alone needs"):
        chunk_prompt(phrases_from_caption("word " * 300 + ". cat"), tok)


def test_lvis_chunk_modes(model):
    names = [f"{w} {v}" for w in ("red", "blue", "green", "small", "large") for v in
             ("cup", "chair", "aerosol_can", "traffic light", "bat_(animal)", "teddy bear", "umbrella", "kite")] * 6
    off = lvis_chunks(names, model.tokenizer, mode="official")
    packed = lvis_chunks(names, model.tokenizer, mode="packed")
    assert [len(c) for c in off[:-1]] == [40] * (len(off) - 1)
    assert len(packed) < len(off)
    assert all(c.post == {"detections_per_img": 300} for c in off)
    for c in packed:
        assert caption_tokens(model.tokenizer, c.prompt.caption) <= 256
        assert c.post["detections_per_img"] == -(-300 * len(c) // 40)
    assert [n for c in packed for n in c.index] == list(range(len(names)))
