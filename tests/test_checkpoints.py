"""glip_pl.checkpoints: every reader that checks a state dict against a model reports the same way (one check)."""

import pytest
import torch

from glip_pl.checkpoints import CheckpointError, load_glip_checkpoint, load_model_weights, write_glip_checkpoint
from glip_pl.checkpoints.official import glip_to_official
from glip_pl.model import build_glip


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_glip("tiny")


def _broken(model) -> tuple:
    """The model's state dict with one name missing, one unexpected and one wrongly shaped."""
    sd = dict(model.state_dict())
    names = list(sd)
    gone, bent = names[0], names[1]
    del sd[gone]
    sd[bent] = torch.zeros(3, 1)
    sd["extra.weight"] = torch.zeros(2)
    return sd, gone, bent, tuple(model.state_dict()[bent].shape)


def test_every_reader_reports_missing_unexpected_and_shapes_alike(tiny, tmp_path):
    sd, gone, bent, shape = _broken(tiny)
    path = tmp_path / "broken.pt"
    write_glip_checkpoint(path, "tiny", tiny.cfg, sd)
    expected = (f"1 missing [{gone!r}], 1 unexpected ['extra.weight'], 1 shape mismatches "
                f"['{bent}: checkpoint (3, 1) vs model {shape}']")
    messages = []
    for read in (lambda: load_glip_checkpoint(path), lambda: load_model_weights(build_glip("tiny"), path),
                 lambda: glip_to_official(sd, "tiny")):
        with pytest.raises(CheckpointError) as e:
            read()
        messages.append(str(e.value))
    assert all(m.endswith(expected) for m in messages), messages
    assert messages[0].startswith(f"{path}: ") and messages[1].startswith(f"{path}: ")


def test_optional_names_may_be_missing(tiny, tmp_path):
    """``optional_state_keys`` (the zero-init prompt of prompt tuning) may be absent from the file; nothing else."""
    path = tmp_path / "detector.pt"
    write_glip_checkpoint(path, "tiny", tiny.cfg, tiny.state_dict())
    target = build_glip("tiny", prompt_tuning=True)
    prompt = target.state_dict()["prompt.weight"].clone()
    load_model_weights(target, path)
    assert torch.equal(target.state_dict()["prompt.weight"], prompt)
    name = next(iter(tiny.state_dict()))
    assert torch.equal(target.state_dict()[name], tiny.state_dict()[name])
    sd = dict(tiny.state_dict())
    del sd[name]
    write_glip_checkpoint(path, "tiny", tiny.cfg, sd)
    with pytest.raises(CheckpointError, match=f"1 missing \\[{name!r}\\]"):
        load_model_weights(build_glip("tiny", prompt_tuning=True), path)
