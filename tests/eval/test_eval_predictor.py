"""Predictor: boxes in original image pixels, phrase spans, chunked long prompts, checkpoints, the predict CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from glip_pl.checkpoints import write_glip_checkpoint
from glip_pl.checkpoints.glip import DEFAULT_LOADERS
from glip_pl.eval.predictor import Predictor, resized_size
from glip_pl.model.prompts import phrases_from_caption

POST = dict(score_thresh=0.0)


@pytest.fixture(scope="module")
def model():
    from glip_pl.model import build_glip

    torch.manual_seed(0)
    return build_glip("tiny").eval()


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8), "RGB")  # h=50, w=80


def test_resize_rule():
    assert resized_size(480, 640) == (800, 1066)
    assert resized_size(500, 2000) == (333, 1332)  # the longer side caps the scale (int() as the official)
    assert resized_size(800, 600) == (1066, 800)
    assert resized_size(50, 80, 64, 100) == (62, 99)


def test_boxes_in_original_pixels_with_spans(model, image):
    pred = Predictor(model, min_size=64, max_size=100, **POST)
    caption = "a cat. a remote control"
    out = pred.predict(image, caption)
    assert out.image_size == (50, 80) and len(out) > 0
    b = out.boxes
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 80).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 50).all()
    # the same model run on the resized image, boxes rescaled by hand
    t, orig = pred.prepare(image)
    assert tuple(t.shape) == (3, 62, 99) and orig == (50, 80)
    ref = model.predict([t], [caption], **POST)[0]
    scale = torch.tensor([80 / 99, 50 / 62, 80 / 99, 50 / 62])
    torch.testing.assert_close(out.boxes, ref.boxes * scale)
    assert torch.equal(out.labels, ref.labels)
    assert set(out.phrases) <= {"a cat", "a remote control"}
    for phrase, spans in zip(out.phrases, out.spans):
        assert [caption[s:e] for s, e in spans] == [phrase]
    rec = out.to_dicts()[0]
    assert set(rec) == {"box", "score", "label", "phrase", "spans"} and caption[slice(*rec["spans"][0])] == rec["phrase"]


def test_inputs_and_batch(model, image, tmp_path):
    pred = Predictor(model, min_size=64, max_size=100, **POST)
    path = tmp_path / "im.png"
    image.save(path)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    a = pred.predict(image, "a cat")
    for other in (path, str(path), tensor, tensor.float() / 255.0, np.asarray(image)):
        o = pred.predict(other, "a cat")
        assert torch.equal(o.boxes, a.boxes) and torch.equal(o.scores, a.scores)
    batch = pred.predict_batch([image, image], "a cat")
    torch.testing.assert_close(batch[0].boxes, a.boxes)  # equal sizes: no padding, same result
    mixed = pred.predict_batch([image, image], ["a cat", ["dog", "remote"]])
    assert mixed[1].prompt.names == ["dog", "remote"]


def test_long_prompt_is_chunked(model, image):
    pred = Predictor(model, min_size=64, max_size=100, **POST)
    phrases = [f"a blue object number {i}" for i in range(60)]
    caption = ". ".join(phrases)
    chunks = pred.chunks_for(caption)
    assert len(chunks) >= 2
    out = pred.predict(image, caption)
    assert 0 < len(out) <= model.cfg.detections_per_img
    assert (out.scores[:-1] >= out.scores[1:]).all()
    prompt = phrases_from_caption(caption)
    for label, phrase, spans in zip(out.labels.tolist(), out.phrases, out.spans):
        assert phrase == phrases[label]
        assert [caption[s:e] for s, e in spans] == [phrase]
    # each chunk's detections equal the model run on that chunk's prompt alone (backbone reused, same result)
    t, _ = pred.prepare(image)
    per = pred.detect([image], chunks, merge=False)[0]
    for ch, d in zip(chunks, per):
        ref = model.predict([t], [ch.prompt], orig_sizes=[(50, 80)], **POST)[0]
        torch.testing.assert_close(d.scores, ref.scores, atol=1e-5, rtol=1e-5)
        assert torch.equal(d.labels, ref.labels)
    assert len(prompt) == 60


def test_from_checkpoint_dispatches_to_loaders(model, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"not really a checkpoint")
    seen = []

    def loader(path):
        seen.append(path)
        return model

    p = Predictor.from_checkpoint(ckpt, loader=loader, min_size=64)
    assert p.model is model and seen == [str(ckpt)] and p.min_size == 64
    mine = {"test-loader": loader, **DEFAULT_LOADERS}
    assert Predictor.from_checkpoint(ckpt, loaders=mine).model is model  # loaders are tried in order
    assert Predictor.from_checkpoint(ckpt, loader="test-loader", loaders=mine).model is model
    assert list(DEFAULT_LOADERS) == ["glip_pl"]
    with pytest.raises(TypeError):  # no process-wide registry that one caller's loader could change for all
        DEFAULT_LOADERS["test-loader"] = loader
    from glip_pl.model.types import GLIPInputError

    with pytest.raises(GLIPInputError, match="no loader could read it"):
        Predictor.from_checkpoint(ckpt)
    with pytest.raises(GLIPInputError, match="unknown checkpoint loader 'test-loader'"):
        Predictor.from_checkpoint(ckpt, loader="test-loader")
    with pytest.raises(GLIPInputError, match="no such file"):
        Predictor.from_checkpoint(tmp_path / "missing.ckpt")


def test_predict_cli_writes_json_and_png(model, image, tmp_path, capsys):
    from glip_pl.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    image.save(folder / "one.png")
    image.resize((40, 60)).save(folder / "two.jpg")
    (folder / "notes.txt").write_text("not an image")
    ckpt = tmp_path / "m.ckpt"
    write_glip_checkpoint(ckpt, "tiny", model.cfg, model.state_dict())
    rc = main(["predict", "--ckpt", str(ckpt), "--image", str(folder), "--prompt", "a cat. a remote control",
               "--out", str(tmp_path / "out"), "--threshold", "0.0", "--min-size", "64", "--max-size", "100"])
    assert rc == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["one.png.json", "one.png.png", "predictions.json", "two.jpg.json",
                                                     "two.jpg.png"]
    rec = json.loads((out / "two.jpg.json").read_text())
    assert (rec["height"], rec["width"]) == (60, 40)
    assert rec["phrases"] == [{"text": "a cat", "spans": [[0, 5]]}, {"text": "a remote control", "spans": [[7, 23]]}]
    assert rec["detections"] and all(0 <= d["box"][2] <= 40 and 0 <= d["box"][3] <= 60 for d in rec["detections"])
    with Image.open(out / "one.png.png") as png:
        assert png.size == (80, 50)
        assert np.abs(np.asarray(png, dtype=int) - np.asarray(image, dtype=int)).sum() > 0  # something was drawn
    summary = json.loads((out / "predictions.json").read_text())
    assert (summary["predicted"], summary["failed"], len(summary["images"])) == (2, 0, 2)
    rc = main(["predict", "--ckpt", str(ckpt), "--image", str(tmp_path / "nope.png"), "--prompt", "a cat"])
    assert rc == 2 and "no such image" in capsys.readouterr().err


def test_from_checkpoint_default_loader_reads_glip_pl_model_files(model, image, tmp_path):
    """The default loader (glip_pl.checkpoints.load_glip_checkpoint) rebuilds the model a glip_pl file describes."""
    from dataclasses import asdict

    path = tmp_path / "tiny.pt"
    torch.save({"format": "glip_pl", "format_version": 1, "preset": "tiny", "config": asdict(model.cfg),
                "state_dict": model.state_dict()}, path)
    loaded = Predictor.from_checkpoint(path, min_size=64, max_size=100, **POST)
    assert loaded.model is not model
    a = loaded.predict(image, "a cat")
    b = Predictor(model, min_size=64, max_size=100, **POST).predict(image, "a cat")
    assert len(a) > 0 and torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
