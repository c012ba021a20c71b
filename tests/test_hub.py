"""Pretrained weights by name, offline: a Hugging Face cache laid out as ``huggingface_hub`` lays it out, holding a
fake official GLIP-T(A) checkpoint and a timm Swin state dict, resolved by name into a prediction, a converted
checkpoint and a loaded Swin; the errors for a missing file, an unknown name and a name that is not cached."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from helpers.imports import imported_after
from test_official import official_file, random_official

from glip_pl.cli import main
from glip_pl.hub import (
    OFFICIAL_WEIGHTS,
    SWIN_FOR_PRESET,
    official_checkpoint,
    resolve_official,
    resolve_swin,
    swin_repo,
)
from glip_pl.model.backbone import SwinBody
from glip_pl.model.presets import get_config
from glip_pl.model.types import GLIPInputError
from glip_pl.checkpoints import load_glip_checkpoint

REVISION = "0123456789abcdef0123456789abcdef01234567"


def put_in_hf_cache(hub_dir: Path, repo: str, filename: str, write) -> Path:
    """``write(path)`` makes the file; it lands as ``models--ORG--NAME/blobs/<sha256>`` with ``refs/main`` and a
    ``snapshots/<rev>/<filename>`` link, as ``hf_hub_download`` leaves a download."""
    root = hub_dir / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    tmp = root / "blobs" / "incoming"
    write(tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    blob = root / "blobs" / digest
    os.replace(tmp, blob)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    link = root / "snapshots" / REVISION / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty offline HF cache and glip_pl cache, read from the environment at call time."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GLIP_PL_CACHE", str(tmp_path / "glip_pl_cache"))
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    return hub


@pytest.fixture(scope="module")
def glip_t_a_official(tmp_path_factory):
    """A random official GLIP-T(A) file (its tensors share one 4M-value pool, so the file is small)."""
    path = tmp_path_factory.mktemp("official") / "glip_a_tiny_o365.pth"
    sd = random_official("glip_t_a", seed=5)
    official_file(path, sd)
    return path, sd


# ------------------------------------------------------------------------------------------ official GLIP


def test_glip_t_a_by_name_to_a_prediction_converted_once(hf_home, glip_t_a_official, tmp_path):
    from glip_pl.eval.predictor import Predictor

    src, sd = glip_t_a_official
    w = OFFICIAL_WEIGHTS["glip_t_a"]
    put_in_hf_cache(hf_home, w.repo, w.filename, lambda p: p.write_bytes(src.read_bytes()))
    assert Path(resolve_official("glip_t_a")).read_bytes() == src.read_bytes()

    predictor = Predictor.from_pretrained("glip_t_a", min_size=96, max_size=128)
    head = predictor.model.head.dyhead_tower[2].offset.weight  # official rpn.head.dyhead_tower.0 (T(A): 3k+2)
    assert torch.equal(head.detach(), sd["rpn.head.dyhead_tower.0.offset.weight"])
    assert predictor.model.cfg.official_compat
    image = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8)
    pred = predictor.predict(image, "a cat. a remote control", score_thresh=0.0)
    assert len(pred) > 0 and set(pred.phrases) <= {"a cat", "a remote control"}
    assert pred.boxes.shape[1] == 4 and (pred.boxes[:, 2] <= 120).all() and (pred.boxes[:, 3] <= 90).all()

    converted = list((tmp_path / "glip_pl_cache" / "official").glob("*.ckpt"))
    blob = hashlib.sha256(src.read_bytes()).hexdigest()[:16]  # named after the content: a new upload converts again
    assert [c.name for c in converted] == [f"glip_a_tiny_o365-{blob}.ckpt"]
    stamp = converted[0].stat().st_mtime_ns
    assert official_checkpoint("glip_t_a") == str(converted[0])  # the conversion happens once
    assert converted[0].stat().st_mtime_ns == stamp


def test_import_official_cli_takes_a_name(hf_home, glip_t_a_official, tmp_path, capsys):
    src, sd = glip_t_a_official
    w = OFFICIAL_WEIGHTS["glip_t_a"]
    put_in_hf_cache(hf_home, w.repo, w.filename, lambda p: p.write_bytes(src.read_bytes()))
    out = tmp_path / "glip_t_a.ckpt"
    assert main(["import-official", "glip_t_a", str(out)]) == 0  # --preset comes from the name
    assert "wrote" in capsys.readouterr().out
    model = load_glip_checkpoint(out, preset="glip_t_a")
    assert torch.equal(model.head.bias0.detach(), sd["rpn.head.bias0"])

    assert main(["import-official", "glip_t_a", str(out), "--preset", "glip_t"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["import-official", "glip_t", str(out)]) == 2  # not cached, offline
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1" in err and "`hf download GLIPModel/GLIP glip_tiny_model_o365_goldg_cc_sbu.pth`" in err
    assert main(["import-official", str(tmp_path / "nope.pth"), str(out)]) == 2
    assert "no such checkpoint file, and not a released model's name" in capsys.readouterr().err


def test_official_name_errors(hf_home):
    with pytest.raises(GLIPInputError, match=r"unknown pretrained GLIP name 'glip_xl'; known names: glip_t_a"):
        resolve_official("glip_xl")
    with pytest.raises(GLIPInputError, match=r"not in the Hugging Face cache .* and HF_HUB_OFFLINE=1; run once with "
                                             r"network: `hf download GLIPModel/GLIP glip_large_model.pth`"):
        resolve_official("glip_l")
    from glip_pl.eval.predictor import Predictor

    with pytest.raises(GLIPInputError, match="unknown pretrained GLIP name"):
        Predictor.from_pretrained("glip_t_x")


# ------------------------------------------------------------------------------------------ ImageNet Swin


def _timm_swin_in_cache(hub_dir: Path, name: str, swin_cfg, seed: int) -> dict:
    """A randomly initialised timm classifier Swin saved as timm publishes it: model.safetensors + config.json."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(swin_cfg.timm_name, embed_dim=swin_cfg.embed_dim, depths=swin_cfg.depths,
                              num_heads=swin_cfg.num_heads, window_size=swin_cfg.window_size)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    repo = timm.models.get_pretrained_cfg(name[len("timm/"):]).hf_hub_id
    put_in_hf_cache(hub_dir, repo, "model.safetensors", lambda p: save_file(sd, str(p)))
    config = {"architecture": swin_cfg.timm_name, "num_classes": model.num_classes,
              "pretrained_cfg": model.pretrained_cfg}
    put_in_hf_cache(hub_dir, repo, "config.json", lambda p: p.write_text(json.dumps(config, default=list)))
    return sd


def _assert_every_param_from(body: SwinBody, sd: dict) -> None:
    """Every Swin parameter of glip_pl equals the timm tensor of the same name (features_only: layers_{i})."""
    params = dict(body.swin.named_parameters())
    assert params
    for name, p in params.items():
        src = name.replace("layers_", "layers.", 1)
        assert src in sd, f"{name}: not in the timm checkpoint"
        assert torch.equal(p.detach(), sd[src]), name


RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "pretrain"


def _recipe_swin(name: str) -> tuple:
    from glip_pl.lit.recipes import load_recipe

    model = load_recipe(RECIPES / name)["model"]  # with the recipe's __base__ merged under it
    return model["preset"], model["model_options"]["swin__pretrained"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_pretrain_recipes_name_the_timm_swin_of_their_preset(recipe):
    preset, value = _recipe_swin(recipe)
    assert value == SWIN_FOR_PRESET[preset]
    assert swin_repo(value).startswith(f"timm/{get_config(preset).swin.timm_name}.")


def test_glip_t_swin_from_a_timm_name_offline(hf_home):
    """The GLIP-T recipe's value loads timm's weights into glip_pl's Swin with no parameter left out."""
    _, recipe_value = _recipe_swin("glip_t.yaml")
    cfg = get_config("glip_t", swin__pretrained=recipe_value).swin
    sd = _timm_swin_in_cache(hf_home, recipe_value, cfg, seed=1)
    _assert_every_param_from(SwinBody(cfg), sd)
    # the untagged name is timm's default tag (ms_in1k: the official swin_tiny_patch4_window7_224.pth)
    assert resolve_swin("timm/swin_tiny_patch4_window7_224") == resolve_swin(recipe_value)


def test_build_glip_with_a_timm_swin_name(hf_home):
    from glip_pl.model import build_glip

    name = "timm/swin_tiny_patch4_window7_224.ms_in22k"  # tiny preset: a small Swin of the same architecture
    sd = _timm_swin_in_cache(hf_home, name, get_config("tiny").swin, seed=2)
    model = build_glip("tiny", swin__pretrained=name)
    _assert_every_param_from(model.backbone.body, sd)


def test_swin_errors_say_what_to_run(hf_home, tmp_path):
    with pytest.raises(GLIPInputError, match=r"swin__pretrained '/path/to/swin_tiny_patch4_window7_224.pth': no such "
                                             r"file; use a timm name such as timm/swin_tiny_patch4_window7_224 "
                                             r"\(downloaded once into the Hugging Face cache\), or download the "
                                             r"official file and give its path"):
        SwinBody(get_config("glip_t", swin__pretrained="/path/to/swin_tiny_patch4_window7_224.pth").swin)
    with pytest.raises(GLIPInputError, match="timm knows no pretrained weights of that name"):
        resolve_swin("timm/swin_tiny_patch4_window7_224.no_such_tag")
    with pytest.raises(GLIPInputError, match=r"timm/swin_large_patch4_window12_384.ms_in22k/model.safetensors is not "
                                             r"in the Hugging Face cache \(.*\) and HF_HUB_OFFLINE=1; run once with "
                                             r"network: `hf download timm/swin_large_patch4_window12_384.ms_in22k "
                                             r"model.safetensors`"):
        resolve_swin(SWIN_FOR_PRESET["glip_l"])
    local = tmp_path / "swin.pth"
    local.write_bytes(b"x")
    assert resolve_swin(str(local)) == str(local)  # local files pass through unchanged


def test_text_encoder_missing_weights_say_what_to_run(hf_home):
    from glip_pl.model.language import TextEncoder, TextEncoderConfig

    with pytest.raises(GLIPInputError,
                       match=r"run once with network: `hf download bert-base-uncased config.json model.safetensors`"):
        TextEncoder(TextEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                      pretrained="bert-base-uncased"))
    with pytest.raises(GLIPInputError, match=r"text__pretrained '/path/to/bert-base-uncased': no such directory"):
        TextEncoder(TextEncoderConfig(pretrained="/path/to/bert-base-uncased"))


def test_online_resolution_downloads_and_falls_back_to_timm_bin(hf_home, monkeypatch, tmp_path):
    """With the network allowed, names go to ``hf_hub_download`` (not cache-only); a repo without
    model.safetensors falls back to pytorch_model.bin as timm does; an unreachable Hub is a clear error."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"weights")

    def fake_download(repo, filename, cache_dir=None, local_files_only=False):
        calls.append((repo, filename, cache_dir, local_files_only))
        if filename == "model.safetensors":
            err = RemoteEntryNotFoundError.__new__(RemoteEntryNotFoundError)  # needs an HTTP response otherwise
            Exception.__init__(err, "404")
            raise err
        return str(weights)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_swin("timm/swin_tiny_patch4_window7_224") == str(weights)
    repo = "timm/swin_tiny_patch4_window7_224.ms_in1k"
    assert calls == [(repo, "model.safetensors", str(hf_home), False), (repo, "pytorch_model.bin", str(hf_home), False)]

    def no_network(*args, **kwargs):
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(GLIPInputError, match=r"not in the Hugging Face cache .* and the Hub cannot be reached; run "
                                             r"once with network: `hf download GLIPModel/GLIP glip_a_tiny_o365.pth`"):
        resolve_official("glip_t_a")


def test_hub_imports_no_lightning():
    code = "import glip_pl.hub as h; h.official_weights('glip_t')"
    assert imported_after(code, prefixes=("glip_pl.lit",)) == []
