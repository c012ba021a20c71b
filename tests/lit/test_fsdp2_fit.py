"""FSDP2 through ``glip-pl fit`` with two processes on CPU (gloo; two simulated nodes, as test_multinode.py):
``GLIPFSDP2Strategy`` shards every GLIP block and the root (glip_pl.lit.strategies). From the same seed it trains
exactly as DDP: the same loss on every rank and step; its sharded checkpoint (a torch.distributed.checkpoint
directory) resumes a stopped run so that weights and AdamW state after the resumed steps equal the uninterrupted
DDP run's bit for bit; ``glip-pl consolidate`` turns the directory into one file that ``load_glip_checkpoint``
reads; and the optimizer's parameter groups (official bias rule, language lr) survive sharding.

Dropout is switched off in both runs (BatchTrace ``disable_dropout``: every ``nn.Dropout``, the fused-attention
ones included), so the comparison does not depend on each strategy drawing random numbers in the same order.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import launch_nodes, wait_all
from helpers.recipe import batch_trace, checkpoint, tiny_recipe

pytestmark = pytest.mark.slow

STOP, STEPS = 2, 4  # the FSDP2 pair stops after STOP steps and resumes to STEPS; DDP runs STEPS in one go
LR, LANG_LR = 0.001, 0.0005
FSDP2 = "glip_pl.lit.strategies.GLIPFSDP2Strategy"


def _recipe(tmp: Path, shards: str, name: str, strategy):
    run = tmp / name
    return tiny_recipe(
        tmp, shards, name, steps=STEPS,
        trainer={"num_nodes": 2, "strategy": strategy, "logger": False,
                 "callbacks": [checkpoint(run, every=STOP), batch_trace(run / "trace", disable_dropout=True)]},
        # the step schedule's milestones depend on max_steps, which the stopped run lowers
        model={"lr": LR, "lang_lr": LANG_LR, "official_bias_rule": True, "schedule": "constant"})


def _pair(cfg, *extra: str, timeout: float = 400) -> list:
    out = wait_all(launch_nodes("fit", *cfg.args, *extra), timeout)
    for rc, o, e in out:
        assert rc == 0, e[-4000:]
    return out


def _trace(run: Path, rank: int) -> list:
    return [json.loads(x) for x in (run / "trace" / f"batches-rank{rank}.jsonl").read_text().splitlines()]


def _dcp(path: Path) -> dict:
    """The whole sharded checkpoint (weights and optimizer state) as one dict; test-side, trusted files."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return sd


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_shards):
    tmp = tmp_path_factory.mktemp("fsdp2")
    ddp = _recipe(tmp, synthetic_shards, "ddp", "ddp")
    fsdp = _recipe(tmp, synthetic_shards, "fsdp", {"class_path": FSDP2})
    _pair(ddp)
    first = _pair(fsdp, "--trainer.max_steps", str(STOP))
    second = _pair(fsdp)  # auto-resume from checkpoints/last.ckpt (a directory)
    return tmp, first, second


def test_fsdp2_trains_as_ddp_and_resumes_exactly(runs):
    tmp, first, second = runs
    for rc, o, e in second:
        assert "resuming from" in e and "last.ckpt" in e, e[-3000:]
    ddp, fsdp = tmp / "ddp", tmp / "fsdp"

    # -- the same samples and the same losses on every rank and step (the FSDP2 run across its restart) ----------
    for rank in (0, 1):
        a, b = _trace(ddp, rank), _trace(fsdp, rank)
        assert [r["global_step"] for r in a] == [r["global_step"] for r in b] == list(range(1, STEPS + 1))
        assert [r["ids"] for r in a] == [r["ids"] for r in b]
        for x, y in zip(a, b):
            # sums of two ranks' gradients are exact in either order, and no clipping is on: no rounding difference
            # is expected; 1e-6 relative leaves room for a reordered float sum elsewhere
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=0), (rank, x, y)

    # -- the sharded checkpoints: one shard file per rank -------------------------------------------------------
    ckdir = fsdp / "checkpoints"
    step2, last = ckdir / f"epoch=0-step={STOP}.ckpt", ckdir / "last.ckpt"
    for d in (step2, last):
        assert d.is_dir() and sorted(p.name for p in d.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], d
    meta = torch.load(last / "meta.pt", weights_only=True)
    assert meta["global_step"] == STEPS

    # -- weights and AdamW state after the resumed steps equal the uninterrupted DDP run's, bit for bit ----------
    ref = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)
    assert ref["global_step"] == STEPS
    got = _dcp(last)
    assert set(got["state_dict"]) == set(ref["state_dict"])
    for k, v in ref["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), (k, float((got["state_dict"][k] - v).abs().max()))
    opt_ref, opt = ref["optimizer_states"][0], got["optimizer_0"]

    # -- the parameter groups survived sharding: names, composition, order, learning rates, weight decay --------
    groups = {g["name"]: g for g in opt["param_groups"]}
    assert set(groups) == {"vision_head", "vision_head_bias", "language", "language_bias"}
    for name, g in groups.items():
        base = LANG_LR if name.startswith("language") else LR
        bias = name.endswith("_bias")
        assert g["initial_lr"] == pytest.approx(base * (2.0 if bias else 1.0))
        assert g["weight_decay"] == (0.0 if bias else 1e-4)
        for fqn in g["params"]:
            assert fqn.startswith("model.language_backbone.") == name.startswith("language"), (name, fqn)
            assert ("bias" in fqn) == bias, (name, fqn)
    assert [g["name"] for g in opt_ref["param_groups"]] == [g["name"] for g in opt["param_groups"]]
    n = sum(len(g["params"]) for g in opt["param_groups"])
    assert n == len(ref["state_dict"])  # every parameter is in exactly one group
    # DDP's optimizer state is keyed by position; the groups list the same parameters in the same order
    order = [fqn for g in opt["param_groups"] for fqn in g["params"]]
    assert [i for g in opt_ref["param_groups"] for i in g["params"]] == list(range(n))
    for g_ref, g in zip(opt_ref["param_groups"], opt["param_groups"]):
        assert g_ref["lr"] == g["lr"] and g_ref["weight_decay"] == g["weight_decay"]
    for i, fqn in enumerate(order):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            a, b = opt_ref["state"][i][key], opt["state"][fqn][key]
            assert torch.equal(a, b), (fqn, key)


def test_fsdp2_checkpoint_consolidates_to_one_loadable_file(runs, tmp_path):
    from glip_pl.cli import main
    from glip_pl.checkpoints import load_glip_checkpoint

    tmp = runs[0]
    out = tmp_path / "consolidated.ckpt"
    assert main(["consolidate", str(tmp / "fsdp" / "checkpoints" / f"epoch=0-step={STOP}.ckpt"), str(out)]) == 0
    ck = torch.load(out, weights_only=True)
    assert ck["global_step"] == STOP and ck["hyper_parameters"]["preset"] == "tiny"
    ref = torch.load(tmp / "ddp" / "checkpoints" / f"epoch=0-step={STOP}.ckpt", weights_only=True)
    model = load_glip_checkpoint(out)
    mine = model.state_dict()
    for k, v in ref["state_dict"].items():
        assert torch.equal(mine[k.removeprefix("model.")], v), k
