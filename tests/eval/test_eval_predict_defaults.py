"""``glip-pl predict`` defaults from the checkpoint: the validation size a Lightning checkpoint records (800/1333 for a
model file that records none), the device picked automatically, one threshold flag (``--score-thresh`` a deprecated
alias that warns once), and LightningCLI's batch predict as its own sub-command."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from glip_pl.cli import main
from glip_pl.eval.cli_predict import DEFAULT_THRESHOLD
from glip_pl.eval.predictor import Predictor, checkpoint_defaults


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model file with no sizes, Lightning-style checkpoint whose saved config says val_size 256, val_max_size 400)."""
    from glip_pl.model import build_glip

    torch.manual_seed(0)
    model = build_glip("tiny")
    root = tmp_path_factory.mktemp("predict_defaults")
    plain = root / "tiny.pt"
    torch.save({"format": "glip_pl", "format_version": 1, "preset": "tiny", "config": asdict(model.cfg),
                "state_dict": model.state_dict()}, plain)
    lit = root / "last.ckpt"
    config = {"model": {"preset": "tiny"},  # as LightningCLI saves it: the datamodule's class and init_args
              "data": {"class_path": "glip_pl.lit.datamodule.GroundingDataModule",
                       "init_args": {"val_size": 256, "val_max_size": 400, "batch_size": 2}}}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"preset": "tiny", "model_options": {}},
                "glip_pl_config": yaml.safe_dump(config), "global_step": 10}, lit)
    return plain, lit


def _folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8), "RGB").save(folder / "a.png")
    return folder


def test_predictor_takes_the_validation_size_the_checkpoint_records(tiny):
    plain, lit = tiny
    assert checkpoint_defaults(lit) == {"min_size": 256, "max_size": 400}
    assert checkpoint_defaults(plain) == {}
    image = Image.new("RGB", (150, 100))
    p = Predictor.from_checkpoint(lit)
    assert (p.min_size, p.max_size) == (256, 400)
    assert tuple(p.prepare(image)[0].shape) == (3, 256, 384)  # shorter side 100 -> 256
    p = Predictor.from_checkpoint(plain)
    assert (p.min_size, p.max_size) == (800, 1333)
    p = Predictor.from_checkpoint(lit, min_size=128)  # given wins
    assert (p.min_size, p.max_size) == (128, 400)


def test_predict_cli_resizes_to_the_checkpoint_size_on_the_auto_device(tiny, tmp_path, capsys):
    plain, lit = tiny
    folder = _folder(tmp_path)
    assert main(["predict", "--ckpt", str(lit), "--image", str(folder), "--prompt", "a cat", "--out",
                 str(tmp_path / "o1")]) == 0
    settings = json.loads((tmp_path / "o1" / "predictions.json").read_text())["settings"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert settings == {"min_size": 256, "max_size": 400, "threshold": DEFAULT_THRESHOLD, "device": device}
    assert "shorter side 256" in capsys.readouterr().out
    assert main(["predict", "--ckpt", str(plain), "--image", str(folder), "--prompt", "a cat", "--out",
                 str(tmp_path / "o2"), "--device", "cpu", "--max-size", "900"]) == 0
    settings = json.loads((tmp_path / "o2" / "predictions.json").read_text())["settings"]
    assert settings == {"min_size": 800, "max_size": 900, "threshold": DEFAULT_THRESHOLD, "device": "cpu"}


def test_score_thresh_is_a_deprecated_alias_of_threshold_that_warns_once(tiny, tmp_path, capsys):
    _, lit = tiny
    folder = _folder(tmp_path)
    base = ["predict", "--ckpt", str(lit), "--image", str(folder), "--prompt", "a cat. a dog", "--min-size", "64",
            "--max-size", "100"]
    assert main(base + ["--out", str(tmp_path / "new"), "--threshold", "0"]) == 0
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "old"), "--score-thresh", "0.3", "--score-thresh", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count("--score-thresh is deprecated") == 1 and "--threshold" in err, err
    new = json.loads((tmp_path / "new" / "predictions.json").read_text())
    old = json.loads((tmp_path / "old" / "predictions.json").read_text())
    assert old["settings"]["threshold"] == 0.0 and old["images"] == new["images"] and new["images"][0]["detections"]


def test_batch_predict_is_its_own_sub_command(monkeypatch, capsys):
    import glip_pl.lit.cli as lit_cli

    seen = []
    monkeypatch.setattr(lit_cli, "run", lambda argv: seen.append(argv) or 0)
    assert main(["predict-batch", "--config", "r.yaml", "--ckpt_path", "x.ckpt"]) == 0
    assert seen == [["predict", "--config", "r.yaml", "--ckpt_path", "x.ckpt"]]
    for old in (["predict", "--config", "r.yaml"], ["predict", "-c", "r.yaml"], ["predict", "--config=r.yaml"]):
        assert main(old) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "glip-pl predict-batch --config" in err[0], err
    assert len(seen) == 1  # the old form no longer starts LightningCLI silently
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "predict-batch" in capsys.readouterr().out
