"""``glip-pl predict`` on a folder: one output per input (extension kept), a summary no image can replace, unreadable
files reported and counted while the rest complete, and bad arguments refused by argparse."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from glip_pl.cli import main

SIZES = ["--min-size", "64", "--max-size", "100", "--threshold", "0"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A glip_pl model file of an untrained tiny model (read by the default loader, as a user's would be)."""
    from glip_pl.model import build_glip

    torch.manual_seed(0)
    model = build_glip("tiny")
    path = tmp_path_factory.mktemp("predict_ckpt") / "tiny.pt"
    torch.save({"format": "glip_pl", "format_version": 1, "preset": "tiny", "config": asdict(model.cfg),
                "state_dict": model.state_dict()}, path)
    return str(path)


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _predict(ckpt, folder, out, *extra):
    return main(["predict", "--ckpt", ckpt, "--image", str(folder), "--prompt", "a cat. a dog", "--out", str(out),
                 *SIZES, *extra])


def test_same_stem_and_an_image_named_like_the_summary_get_outputs_of_their_own(ckpt, tmp_path):
    folder, out = tmp_path / "imgs", tmp_path / "out"
    folder.mkdir()
    _image(50, 80, 0).save(folder / "a.jpg")
    _image(60, 40, 1).save(folder / "a.png")
    _image(30, 70, 2).save(folder / "predictions.png")
    assert _predict(ckpt, folder, out, "--batch-size", "2") == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg.json", "a.jpg.png", "a.png.json", "a.png.png",
                                                     "predictions.json", "predictions.png.json", "predictions.png.png"]
    for name, (h, w) in (("a.jpg", (50, 80)), ("a.png", (60, 40)), ("predictions.png", (30, 70))):
        rec = json.loads((out / f"{name}.json").read_text())
        assert rec["image"] == str(folder / name) and (rec["height"], rec["width"]) == (h, w)
        with Image.open(out / f"{name}.png") as png:
            assert png.size == (w, h)
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["predicted"] == 3 and summary["failed"] == 0 and summary["errors"] == []
    assert sorted(r["image"] for r in summary["images"]) == sorted(str(folder / n) for n in
                                                                   ("a.jpg", "a.png", "predictions.png"))


def test_unreadable_files_are_reported_and_counted_while_the_others_complete(ckpt, tmp_path, capsys):
    folder, out = tmp_path / "imgs", tmp_path / "out"
    folder.mkdir()
    _image(50, 80, 0).save(folder / "b_good.png")
    (folder / "c_bad.jpg").write_bytes(b"not an image at all")
    _image(40, 40, 1).save(folder / "d_cut.png")
    (folder / "d_cut.png").write_bytes((folder / "d_cut.png").read_bytes()[:200])  # truncated in its pixel data
    _image(60, 40, 2).save(folder / "e_good.jpg")
    capsys.readouterr()
    rc = _predict(ckpt, folder, out, "--batch-size", "2")  # each bad file shares a batch with a good one
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 2 and "c_bad.jpg" in err[0] and "d_cut.png" in err[1], err
    assert all("cannot be read as an image" in line for line in err)
    assert sorted(p.name for p in out.iterdir()) == ["b_good.png.json", "b_good.png.png", "e_good.jpg.json",
                                                     "e_good.jpg.png", "predictions.json"]
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["predicted"] == 2 and summary["failed"] == 2
    assert [e["image"] for e in summary["errors"]] == [str(folder / "c_bad.jpg"), str(folder / "d_cut.png")]
    assert [r["image"] for r in summary["images"]] == [str(folder / "b_good.png"), str(folder / "e_good.jpg")]


def test_outputs_never_replace_an_input_image(ckpt, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _image(50, 80, 0).save(folder / "a.jpg")
    _image(50, 80, 1).save(folder / "a.jpg.png")  # what a.jpg's drawing would be named
    before = (folder / "a.jpg.png").read_bytes()
    assert _predict(ckpt, folder, folder) == 2
    assert "would overwrite an input image" in capsys.readouterr().err
    assert (folder / "a.jpg.png").read_bytes() == before and sorted(p.name for p in folder.iterdir()) == \
        ["a.jpg", "a.jpg.png"]


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--batch-size", "x"),
                                        ("--threshold", "nan"), ("--threshold", "-0.1"), ("--threshold", "1.5"),
                                        ("--threshold", "inf"), ("--score-thresh", "nan"), ("--max-size", "0"),
                                        ("--min-size", "-1")])
def test_bad_arguments_are_refused_before_anything_runs(ckpt, tmp_path, capsys, flag, value):
    folder, out = tmp_path / "imgs", tmp_path / "out"
    folder.mkdir()
    _image(50, 80, 0).save(folder / "a.png")
    with pytest.raises(SystemExit) as e:
        main(["predict", "--ckpt", ckpt, "--image", str(folder), "--prompt", "a cat", "--out", str(out),
              f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err.splitlines()[-1], err
    assert not out.exists()
