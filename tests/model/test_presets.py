"""Presets reproduce the official parameter counts (reference §7); the model library stays plain PyTorch."""

import pytest
import torch
from helpers.imports import imported_after

from glip_pl.model import OFFICIAL_PARAMS, build_glip, get_config
from glip_pl.model.types import GLIPInputError


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["glip_t", "glip_l", "glip_t_a"])
def test_official_parameter_counts_on_meta(preset):
    with torch.device("meta"):
        model = build_glip(preset)
    n = _count(model)
    # the official build's counts (reference §7) less its unused 80-class cls_logits conv (256*80 + 80 = 20,560)
    official = {"glip_t": 231_780_222, "glip_l": 430_422_384, "glip_t_a": 151_430_526}[preset]
    assert n == OFFICIAL_PARAMS[preset] == official - 20_560, (preset, n)
    # the parts the reference measures exactly
    assert _count(model.backbone.body) == {"glip_t": 27_520_506, "glip_t_a": 27_520_506, "glip_l": 195_200_820}[preset]
    assert _count(model.language_backbone) == 108_891_648


def test_glip_l_freezes_patch_embed_and_first_stage():
    with torch.device("meta"):
        model = build_glip("glip_l")
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 1_202_316  # reference §1.2


def test_tiny_is_small():
    model = build_glip("tiny")
    assert _count(model) * 4 < 16 * 2**20  # a few MB of fp32 weights


def test_overrides_and_unknown_options():
    cfg = get_config("glip_t", swin__drop_path_rate=0.1, num_blocks=2)
    assert cfg.swin.drop_path_rate == 0.1 and cfg.num_blocks == 2
    with pytest.raises(GLIPInputError, match="unknown model option 'nm_blocks'"):
        get_config("glip_t", nm_blocks=2)
    with pytest.raises(GLIPInputError, match="unknown preset"):
        get_config("glip_x")


FORBIDDEN = ("lightning", "pytorch_lightning", "wandb", "deepspeed", "torch.distributed", "glip_pl.lit",
             "glip_pl.data", "glip_pl.distributed")


def test_model_library_imports_no_training_infrastructure():
    """glip_pl.model's own code imports no training infrastructure (DESIGN.md practice 1). (timm and
    transformers import wandb / torch.distributed internally; that is theirs, so the check reads our sources.)"""
    import ast
    from pathlib import Path

    import glip_pl.model as m

    bad = []
    for path in Path(m.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            bad += [f"{path.name}: {n}" for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, bad
    assert imported_after("import glip_pl.model as m; m.build_glip('tiny')",
                          prefixes=("glip_pl.lit", "glip_pl.data")) == []
