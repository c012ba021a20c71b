"""NonFiniteGuard and GradNormMonitor under DeepSpeed, with a stand-in strategy and engine (Lightning's
DeepSpeedStrategy refuses a CPU), and the loss normaliser's all-reduce without a barrier."""

import math
from types import SimpleNamespace

import pytest
import torch

from glip_pl.lit.callbacks import GradNormMonitor
from glip_pl.lit.guards import NonFiniteGuard


class DeepSpeedStrategy:  # the guard recognises Lightning's strategy by its class name
    pass


class Engine:
    def __init__(self, stage=2, fp16=False, bf16=False):
        self.stage, self.fp16, self.bf16 = stage, fp16, bf16
        self.applied, self.norm = True, 3.5

    def zero_optimization_stage(self):
        return self.stage

    def fp16_enabled(self):
        return self.fp16

    def bfloat16_enabled(self):
        return self.bf16

    def was_step_applied(self):
        return self.applied

    def is_gradient_accumulation_boundary(self):
        return True

    def get_global_grad_norm(self):
        return self.norm


class Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 2)
        self.global_step, self.hparams, self.logged = 7, {"max_bad_steps": 3}, {}

    def log(self, k, v, **kw):
        self.logged[k] = float(v)

    def log_dict(self, d, **kw):
        self.logged.update({k: float(v) for k, v in d.items()})


def _trainer(tmp_path, engine):
    return SimpleNamespace(strategy=DeepSpeedStrategy(), model=engine, checkpoint_callback=None,
                           default_root_dir=str(tmp_path), is_global_zero=True, global_step=7)


def test_deepspeed_nonfinite_loss_gives_every_parameter_a_nan_gradient_instead_of_none(tmp_path, capsys):
    mod, engine = Module(), Engine(stage=2)
    trainer, guard = _trainer(tmp_path, engine), NonFiniteGuard()
    good = mod.net(torch.ones(1, 3)).sum()
    assert guard.check_loss(trainer, mod, good) is good
    out = guard.check_loss(trainer, mod, good * float("nan"))
    assert out is not None and out.requires_grad  # Lightning's DeepSpeed plugin refuses None
    out.backward()
    assert all(torch.isnan(p.grad).all() for p in mod.parameters())  # the engine's overflow check skips the step
    assert guard.bad_total == guard.bad_in_row == 1 and mod.logged["train/bad_steps"] == 1.0
    engine.applied = False
    guard.on_train_batch_end(trainer, mod, None, None, 0)  # skipped as expected: still one bad step
    assert guard.bad_in_row == 1 and "non-finite loss nan; step skipped" in capsys.readouterr().out
    engine.applied = True
    guard.on_train_batch_end(trainer, mod, None, None, 0)  # a good step resets the run of bad ones
    assert guard.bad_in_row == 0 and guard.bad_total == 1


def test_deepspeed_overflow_skip_counts_as_a_bad_gradient_step_and_the_limit_stops(tmp_path):
    mod, engine = Module(), Engine(stage=2)
    trainer, guard = _trainer(tmp_path, engine), NonFiniteGuard()
    engine.applied = False
    guard.on_train_batch_end(trainer, mod, None, None, 0)
    guard.on_train_batch_end(trainer, mod, None, None, 0)
    assert guard.bad_in_row == 2
    with pytest.raises(RuntimeError, match=r"3 consecutive training steps with non-finite gradients \(DeepSpeed "
                                           r"overflow check\).*max_bad_steps=3.*no valid checkpoint found in"):
        guard.on_train_batch_end(trainer, mod, None, None, 0)


def test_deepspeed_without_an_overflow_check_stops_with_step_and_checkpoint(tmp_path):
    mod = Module()
    trainer = _trainer(tmp_path, Engine(stage=0))  # fp32, no ZeRO: the engine would apply a NaN step
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RuntimeError, match=r"non-finite loss nan at step 7: .*cannot skip a step; resume from "
                                           r"no valid checkpoint found in .*checkpoints"):
        NonFiniteGuard().check_loss(trainer, mod, torch.tensor(float("nan"), requires_grad=True))
    # the same engine with bf16 (overflow check on by default) can skip
    trainer = _trainer(tmp_path, Engine(stage=0, bf16=True))
    assert NonFiniteGuard().check_loss(trainer, mod, torch.tensor(float("nan"))) is not None


def test_grad_norm_under_deepspeed_is_the_engines_global_norm_after_the_step(tmp_path):
    mod, engine = Module(), Engine(stage=2)
    trainer, mon = _trainer(tmp_path, engine), GradNormMonitor()
    trainer.global_step = 4
    opt = torch.optim.AdamW(mod.parameters())
    mon.on_before_optimizer_step(trainer, mod, opt)  # ZeRO: no .grad before the step
    assert "grad/norm_total" not in mod.logged
    trainer.global_step = 5  # after the step
    mon.on_train_batch_end(trainer, mod, None, None, 0)
    assert mod.logged["grad/norm_total"] == 3.5 and mon.last_norm == 3.5
    engine.norm = float("inf")  # an overflow-skipped step reports inf
    mon.on_train_batch_end(trainer, mod, None, None, 0)
    assert math.isinf(mod.logged["grad/norm_total"])


def test_reduce_mean_is_one_all_reduce_without_a_barrier(monkeypatch):
    import torch.distributed as dist

    from glip_pl.lit.module import GLIPLitModule

    lit = GLIPLitModule(preset="tiny")
    lit._trainer = SimpleNamespace(world_size=2, strategy=None)  # strategy.reduce is not to be used
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        def no_barrier(*a, **k):
            raise AssertionError("barrier called")

        monkeypatch.setattr(dist, "barrier", no_barrier)
        calls = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: calls.append(kw.get("op")) or real(t, **kw))
        v = torch.tensor(6.0)
        assert float(lit.model.criterion.reduce_mean(v)) == 6.0 and calls == [dist.ReduceOp.SUM]
    finally:
        lit._trainer = None
        dist.destroy_process_group()


ENGINE_WORKER = """
import json, os, sys
from types import SimpleNamespace
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
import torch
torch.set_num_threads(1)
import deepspeed
import deepspeed.comm.torch
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # a C++ op that compiles for minutes
from glip_pl.lit.callbacks import GradNormMonitor
from glip_pl.lit.guards import NonFiniteGuard

class DeepSpeedStrategy:
    pass

class Mod(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        self.global_step, self.hparams, self.logged = 0, {"max_bad_steps": 5}, {}
    def forward(self, x):
        return self.net(x)
    def log(self, k, v, **kw):
        self.logged[k] = float(v)
    def log_dict(self, d, **kw):
        self.logged.update({k: float(v) for k, v in d.items()})

deepspeed.init_distributed(dist_backend="gloo")
mod = Mod()
opt = torch.optim.AdamW(mod.parameters(), lr=1e-2)
cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}
eng, *_ = deepspeed.initialize(model=mod, optimizer=opt, config=cfg, dist_init_required=False)
trainer = SimpleNamespace(strategy=DeepSpeedStrategy(), model=eng, checkpoint_callback=None, default_root_dir=".",
                          is_global_zero=True, global_step=0)
guard, mon = NonFiniteGuard(), GradNormMonitor()
x = torch.randn(2, 4)
ref = Mod()
ref(x).sum().backward()
res = {"ref_norm": torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item()}
loss = guard.check_loss(trainer, mod, eng(x).sum())
eng.backward(loss)
mon.on_before_optimizer_step(trainer, mod, opt)
res["grads_visible"] = sum(p.grad is not None for p in mod.parameters())
eng.step()
trainer.global_step = mod.global_step = 1
guard.on_train_batch_end(trainer, mod, None, None, 0)
mon.on_train_batch_end(trainer, mod, None, None, 0)
res["good_applied"], res["ds_norm"] = eng.was_step_applied(), mod.logged.get("grad/norm_total")
before = [p.detach().clone() for p in mod.parameters()]
loss = guard.check_loss(trainer, mod, eng(x).sum() * float("nan"))
eng.backward(loss)
eng.step()
trainer.global_step = mod.global_step = 2
guard.on_train_batch_end(trainer, mod, None, None, 0)  # raises if the engine applied the step
res.update(bad_applied=eng.was_step_applied(), skipped=eng.skipped_steps, bad_total=guard.bad_total,
           unchanged=all(torch.equal(a, p) for a, p in zip(before, mod.parameters())))
print("RESULT " + json.dumps(res))
"""


@pytest.mark.slow
def test_a_real_zero2_engine_skips_the_guarded_nonfinite_loss(tmp_path):
    """Raw DeepSpeed ZeRO-2 (fp32, 1 process, gloo): the guard's NaN loss makes the engine skip the step (weights
    unchanged, ``skipped_steps`` 1), and the monitored norm of a good step is the engine's global norm, equal to
    plain torch's (tolerance 1e-5 relative)."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", ENGINE_WORKER, str(port)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, r.stderr[-3000:]
    res = json.loads(line[len("RESULT "):])
    assert res["grads_visible"] == 0  # ZeRO-2 keeps its gradients to itself
    assert res["good_applied"] and res["ds_norm"] == pytest.approx(res["ref_norm"], rel=1e-5), res
    assert not res["bad_applied"] and res["skipped"] == 1 and res["unchanged"] and res["bad_total"] == 1, res
