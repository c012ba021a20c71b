"""FSDP2 pieces that need no second process: which modules become FSDP units, the strategy's options, and reading
sharded (torch.distributed.checkpoint) directories safely — consolidation to one loadable file, and refusal of a
directory whose pickles would run code."""

import os
import pickle
import socket

import pytest
import torch
import torch.distributed as dist

from glip_pl.lit.module import GLIPLitModule


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['GLIP_PL_TEST_MARKER']}",))


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_every_glip_block_and_the_root_become_fsdp_units(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from glip_pl.lit.strategies import glip_blocks, shard_glip

    torch.manual_seed(0)
    lit = GLIPLitModule(preset="tiny")
    names = {type(b).__name__ for b in glip_blocks(lit.model)}
    assert names == {"SwinTransformerBlock", "BertLayer", "TextLayer", "BiAttentionFusion", "DyHeadBlock"}
    n_blocks = len(glip_blocks(lit.model))
    before = {k: v.clone() for k, v in lit.model.state_dict().items()}
    shard_glip(lit.model, init_device_mesh("cpu", (1,)), param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    units = [m for m in lit.model.modules() if isinstance(m, FSDPModule)]
    assert len(units) == n_blocks + 1 and units[0] is lit.model
    assert all(isinstance(p, DTensor) for p in lit.model.parameters())
    # parameter names do not change (the optimizer's groups and checkpoints are keyed by them)
    after = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in lit.model.state_dict().items()}
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_configure_model_leaves_other_strategies_alone():
    lit = GLIPLitModule(preset="tiny")
    params = [id(p) for p in lit.parameters()]
    lit.configure_model()  # no trainer, as under DDP / single device: nothing to shard
    assert [id(p) for p in lit.parameters()] == params


def test_strategy_options():
    from glip_pl.lit.strategies import GLIPFSDP2Strategy

    s = GLIPFSDP2Strategy(activation_checkpointing=["fusion", "dyhead"], param_dtype="bf16", reduce_dtype="fp32")
    assert s.glip_options["activation_checkpointing"] == ("fusion", "dyhead")
    assert s.glip_options["param_dtype"] is torch.bfloat16 and s.glip_options["reduce_dtype"] is torch.float32
    assert GLIPFSDP2Strategy(activation_checkpointing=True).glip_options["activation_checkpointing"] == \
        ("backbone", "text", "fusion", "dyhead")
    with pytest.raises(ValueError, match="unknown part"):
        GLIPFSDP2Strategy(activation_checkpointing=["fusoin"])
    with pytest.raises(ValueError, match="param_dtype"):
        GLIPFSDP2Strategy(param_dtype="bf61")


def test_activation_checkpointing_switches_keep_outputs():
    from glip_pl.lit.strategies import enable_activation_checkpointing
    from glip_pl.model.types import TextInputs

    torch.manual_seed(0)
    lit = GLIPLitModule(preset="tiny")
    model = lit.model.eval()
    images = torch.rand(1, 3, 64, 64)
    ids = torch.randint(1000, 2000, (1, 5))
    text = TextInputs(ids, torch.ones_like(ids), torch.zeros_like(ids))
    ref = model(images, torch.tensor([[64, 64]]), text).logits
    enable_activation_checkpointing(model)
    assert model.head.checkpoint_fusion and model.head.checkpoint_text and model.head.checkpoint_dyhead
    assert model.language_backbone.model.is_gradient_checkpointing
    assert torch.equal(model(images, torch.tensor([[64, 64]]), text).logits, ref)


def _dcp_dir(tmp_path, extra=None):
    """A one-process torch.distributed.checkpoint directory as GLIPFSDP2Strategy writes it (+ Lightning's meta.pt)."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    lit = GLIPLitModule(preset="tiny")
    d = tmp_path / "last.ckpt"
    state = {"state_dict": {k: v.clone() for k, v in lit.state_dict().items()}, **(extra or {})}
    dcp.save(state, checkpoint_id=str(d), no_dist=True)
    torch.save({"global_step": 7, "epoch": 0, "hyper_parameters": dict(lit.hparams)}, d / "meta.pt")
    return d, lit


def test_consolidate_a_dcp_directory(tmp_path):
    from glip_pl.cli import main
    from glip_pl.checkpoints import load_glip_checkpoint

    d, lit = _dcp_dir(tmp_path)
    out = tmp_path / "one.ckpt"
    assert main(["consolidate", str(d), str(out)]) == 0
    ck = torch.load(out, weights_only=True)
    assert ck["global_step"] == 7 and ck["hyper_parameters"]["preset"] == "tiny"
    model = load_glip_checkpoint(out)
    ref = lit.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_untrusted_dcp_directories_are_refused(tmp_path, monkeypatch):
    from glip_pl.checkpoints.consolidate import consolidate_dcp_checkpoint
    from glip_pl.checkpoints.dcp import check_dcp_checkpoint

    marker = tmp_path / "code-ran"
    monkeypatch.setenv("GLIP_PL_TEST_MARKER", str(marker))

    # a non-tensor entry that would run code when torch.distributed.checkpoint unpickles it (a resume does)
    d, _ = _dcp_dir(tmp_path / "a", extra={"optimizer_0": {"param_groups": [{"lr": 0.1, "evil": _Evil()}]}})
    with pytest.raises(ValueError, match="does not load safely"):
        check_dcp_checkpoint(d)
    assert not marker.exists()

    # a .metadata that would run code when unpickled
    d, _ = _dcp_dir(tmp_path / "b")
    (d / ".metadata").write_bytes(pickle.dumps(_Evil()))
    for fn in (check_dcp_checkpoint, lambda p: consolidate_dcp_checkpoint(p, tmp_path / "x.ckpt")):
        with pytest.raises(pickle.UnpicklingError, match=r"\.metadata names .*system"):
            fn(d)
    assert not marker.exists()


def test_weight_averaging_is_refused_under_fsdp2():
    from types import SimpleNamespace

    from glip_pl.lit.callbacks import EMA
    from glip_pl.lit.strategies import GLIPFSDP2Strategy

    lit = GLIPLitModule(preset="tiny")
    lit._trainer = SimpleNamespace(strategy=GLIPFSDP2Strategy(), callbacks=[EMA()])
    with pytest.raises(ValueError, match="EMA .*does not work with a sharded model"):
        lit.configure_model()


def test_low_precision_parameters_need_autocast():
    """bf16 parameters without autocast would stop at the first conv (fp32 normalised image, bf16 weight)."""
    from types import SimpleNamespace

    from glip_pl.lit.strategies import GLIPFSDP2Strategy

    lit = GLIPLitModule(preset="tiny")
    lit._trainer = SimpleNamespace(strategy=GLIPFSDP2Strategy(param_dtype="bf16"), callbacks=[], precision="32-true")
    with pytest.raises(ValueError, match="needs trainer.precision bf16-mixed"):
        lit.configure_model()
