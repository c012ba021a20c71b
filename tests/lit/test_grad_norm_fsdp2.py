"""GradNormMonitor and NonFiniteGuard under FSDP2 (sharded DTensor gradients), 2 processes over gloo on CPU.

The same step (same weights, each rank its own batch) is run once under DDP and once with ``fully_shard``: the
monitored FSDP2 norm must equal DDP's global norm (fp32, same reduction: tolerance 1e-5 relative), where the norm
of this rank's shard alone (what the monitor reported before) does not. An Inf in one rank's shard must make every
rank skip the step.
"""

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class _Logs(torch.nn.Module):
    """A stand-in for the LightningModule: the monitor calls ``parameters``, ``log_dict`` and ``log``."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.logged = {}
        self.global_step = 0
        self.device = torch.device("cpu")
        self.hparams = {"max_bad_steps": 5}

    def log_dict(self, d, **kw):
        self.logged.update({k: float(v) for k, v in d.items()})

    def log(self, k, v, **kw):
        self.logged[k] = float(v)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel

        from glip_pl.lit.callbacks import GradNormMonitor
        from glip_pl.lit.guards import NonFiniteGuard

        torch.manual_seed(100 + rank)
        x = torch.randn(4, 6)
        trainer = SimpleNamespace(global_step=0, strategy=None, is_global_zero=rank == 0)

        ddp = DistributedDataParallel(_net())
        ddp(x).pow(2).mean().backward()
        ref = torch.cat([p.grad.flatten() for p in ddp.parameters()]).norm().item()

        net = _net()
        for layer in (net[0], net[2]):
            fully_shard(layer)
        fully_shard(net)
        mod = _Logs(net)
        net(x).pow(2).mean().backward()
        assert all(hasattr(p.grad, "to_local") for p in net.parameters())  # sharded DTensor gradients
        opt = torch.optim.AdamW([{"params": list(net.parameters()), "name": "all"}])
        GradNormMonitor().on_before_optimizer_step(trainer, mod, opt)
        shard_only = torch.cat([p.grad.to_local().flatten() for p in net.parameters()]).norm().item()

        guard = NonFiniteGuard()
        guard.on_before_optimizer_step(trainer, mod, opt)  # finite: nothing skipped
        finite_ok = guard.bad_total == 0 and all(p.grad is not None for p in net.parameters())
        if rank == 1:  # an Inf in rank 1's shard only
            p = next(p for p in net.parameters() if p.grad.to_local().numel())
            p.grad.to_local().view(-1)[0] = float("inf")
        guard.on_before_optimizer_step(trainer, mod, opt)
        out[rank] = {"ref": ref, "fsdp": mod.logged["grad/norm_total"], "group": mod.logged["grad/norm_all"],
                     "shard_only": shard_only, "finite_ok": finite_ok, "bad": guard.bad_total,
                     "zeroed": all(p.grad is None for p in net.parameters())}
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_grad_norm_equals_ddp_and_the_guard_sees_every_shard():
    if not dist.is_gloo_available():
        pytest.skip("gloo not available")
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        r = out[rank]
        assert r["fsdp"] == pytest.approx(r["ref"], rel=1e-5) and r["group"] == pytest.approx(r["ref"], rel=1e-5), r
        assert r["shard_only"] != pytest.approx(r["ref"], rel=1e-3), r  # the per-rank norm is not the global one
        assert r["finite_ok"] and r["bad"] == 1 and r["zeroed"], r  # both ranks skipped the step
