"""``glip-pl consolidate``: a real DeepSpeed ZeRO-2 checkpoint (raw ``deepspeed.initialize`` on CPU over gloo, the
module wrapped as Lightning wraps it) → one fp32 file that ``load_glip_checkpoint`` loads with the same weights."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("deepspeed")

MAKE = textwrap.dedent("""\
    import os, sys
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import torch
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.comm.torch
    # a C++ all-reduce op that compiles for minutes on a fresh machine and is not needed here. Through sys.modules:
    # ``import deepspeed.comm.torch as m`` binds the torch package (deepspeed.comm has a ``torch`` attribute).
    ds_torch = sys.modules["deepspeed.comm.torch"]
    assert hasattr(ds_torch, "TorchBackend"), ds_torch
    ds_torch.build_shm_op = lambda: None
    from glip_pl.lit.module import GLIPLitModule

    class Wrapper(torch.nn.Module):  # Lightning's _LightningModuleWrapperBase: parameters under _forward_module.
        def __init__(self, m):
            super().__init__()
            self._forward_module = m

    torch.manual_seed(0)
    lit = GLIPLitModule(preset="tiny", model_options={"num_blocks": 1})
    w = Wrapper(lit)
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
           "zero_allow_untested_optimizer": True}
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(model=w, optimizer=torch.optim.AdamW(w.parameters(), lr=1e-4), config=cfg)
    # as DeepSpeedStrategy.save_checkpoint: Lightning's state as client_state, tag "checkpoint"
    engine.save_checkpoint(sys.argv[1], tag="checkpoint",
                           client_state={"hyper_parameters": dict(lit.hparams), "global_step": 3, "epoch": 0})
    torch.save(lit.state_dict(), sys.argv[1] + ".reference.pt")
    """)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_consolidate_zero2_checkpoint(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    zero = tmp_path / "last.ckpt"
    r = subprocess.run([sys.executable, "-c", MAKE, str(zero), str(_port())], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (zero / "latest").read_text().strip() == "checkpoint"
    assert list((zero / "checkpoint").glob("*optim_states.pt"))

    out = tmp_path / "consolidated.ckpt"
    r = subprocess.run([sys.executable, "-m", "glip_pl.cli", "consolidate", str(zero), str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "wrote" in r.stdout

    ck = torch.load(out, weights_only=True)  # plain tensors and dicts only
    assert ck["hyper_parameters"]["preset"] == "tiny" and ck["global_step"] == 3
    ref = torch.load(str(zero) + ".reference.pt", weights_only=True)
    assert set(ck["state_dict"]) == set(ref)
    assert all(torch.equal(ck["state_dict"][k], ref[k]) for k in ref)
    assert all(v.dtype == torch.float32 for v in ck["state_dict"].values() if v.is_floating_point())

    from glip_pl.official import load_glip_checkpoint

    model = load_glip_checkpoint(out)
    assert model.cfg.num_blocks == 1
    assert torch.equal(model.state_dict()[next(iter(model.state_dict()))],
                       ref["model." + next(iter(model.state_dict()))])


def test_consolidate_refuses_a_file_and_needs_a_preset(tmp_path):
    from glip_pl.lit.consolidate import consolidate_zero_checkpoint

    f = tmp_path / "x.ckpt"
    f.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        consolidate_zero_checkpoint(f, tmp_path / "out.ckpt")
