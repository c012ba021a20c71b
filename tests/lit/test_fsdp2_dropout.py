"""Every dropout of the model is an ``nn.Dropout`` module, so setting their p to 0 makes a training-mode forward
independent of the random stream — what an exact DDP-vs-FSDP2 comparison needs. The fused-attention dropout of the
text layer and the fusion block used to be a float handed to SDPA / ``F.dropout``, out of reach of such a switch."""

import pytest
import torch

from glip_pl.model import build_glip
from glip_pl.model.types import TextInputs


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 96, generator=g)
    ids = torch.randint(1000, 2000, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return images, torch.tensor([[64, 96], [64, 80]]), TextInputs(ids, mask, torch.zeros_like(ids))


def _leaves(out):
    return [v for v in vars(out).values() if torch.is_tensor(v)] + \
        [t for v in vars(out).values() if isinstance(v, (list, tuple)) for t in v if torch.is_tensor(t)]


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "plain"])
def test_dropout_modules_off_means_no_randomness(use_sdpa):
    torch.manual_seed(0)
    model = build_glip("tiny", fusion_dropout=0.1, use_sdpa=use_sdpa).train()
    images, sizes, text = _inputs()
    torch.manual_seed(5)
    a = _leaves(model(images, sizes, text))
    torch.manual_seed(6)
    b = _leaves(model(images, sizes, text))
    assert any(not torch.equal(x, y) for x, y in zip(a, b)), "dropout is on: two seeds must differ"

    n = 0
    for m in model.modules():  # a generic switch: only nn.Dropout modules, nothing GLIP-specific
        if isinstance(m, torch.nn.Dropout):
            m.p, n = 0.0, n + 1
    assert n > 0
    torch.manual_seed(5)
    a = _leaves(model(images, sizes, text))
    torch.manual_seed(6)
    b = _leaves(model(images, sizes, text))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x, y)
