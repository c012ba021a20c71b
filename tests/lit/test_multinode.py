"""Two processes as two simulated nodes (gloo; NODE_RANK / MASTER_ADDR / MASTER_PORT / WORLD_SIZE) train the tiny
preset through the real CLI: each rank reads its own shards, the DDP step equals a single-process step on the same
global batch, rank 0 writes the checkpoint, and the pair resumes from it."""

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import launch_nodes, wait_all
from helpers.recipe import batch_trace, checkpoint, tiny_recipe

pytestmark = pytest.mark.slow

STEPS, RESUMED_STEPS = 2, 3


def recipe(tmp: Path, shards: str, steps: int):
    run = tmp / "run"
    return tiny_recipe(
        tmp, shards, steps=steps,
        trainer={"logger": False,
                 "callbacks": [checkpoint(run, every=2, cls="lightning.pytorch.callbacks.ModelCheckpoint"),
                               batch_trace(tmp / "trace", dump_first_batch=True, disable_dropout=True)]},
        data={"num_workers": 1, "train_min_sizes": [128], "train_max_size": 160})


def launch_pair(cfg, *extra: str, timeout: float = 240) -> list:
    """Two `glip-pl fit` processes, node 0 and node 1 of a 2-node x 1-device DDP job on 127.0.0.1."""
    return wait_all(launch_nodes("fit", *cfg.args, "--trainer.num_nodes", "2", "--trainer.devices", "1",
                                 "--trainer.strategy", "ddp", *extra), timeout)


def read_trace(trace: Path, rank: int) -> list:
    return [json.loads(line) for line in (trace / f"batches-rank{rank}.jsonl").read_text().splitlines()]


def shard_of(shards: str) -> dict:
    """(source, sample id) -> shard file, read from the tar files themselves."""
    import tarfile

    owner = {}
    for src in ("detection", "grounding"):
        for tar in sorted(Path(shards, src).glob("train-*.tar")):
            for name in tarfile.open(tar).getnames():
                if name.endswith(".json"):
                    rec = json.loads(tarfile.open(tar).extractfile(name).read())
                    owner[str(rec["id"])] = tar.name
    return owner


def merge_batches(a, b):
    """One GroundingBatch of a's and b's images (same image size; text and boxes padded to the longer)."""
    from dataclasses import replace

    from glip_pl.model.types import Targets, TextInputs

    assert a.images.shape[1:] == b.images.shape[1:], "the comparison needs equal padded image sizes"
    T = max(a.text.input_ids.shape[1], b.text.input_ids.shape[1])
    M = max(a.targets.boxes.shape[1], b.targets.boxes.shape[1])

    def pad(t, size, dim):
        if t.shape[dim] == size:
            return t
        shape = list(t.shape)
        shape[dim] = size - t.shape[dim]
        return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim)

    text = TextInputs(*(torch.cat([pad(x.text.input_ids if i == 0 else x.text.attention_mask if i == 1
                                       else x.text.token_type_ids, T, 1) for x in (a, b)]) for i in range(3)))
    targets = Targets(
        boxes=torch.cat([pad(x.targets.boxes, M, 1) for x in (a, b)]),
        valid=torch.cat([pad(x.targets.valid, M, 1) for x in (a, b)]),
        positive_map=torch.cat([pad(pad(x.targets.positive_map, M, 1), T, 2) for x in (a, b)]))
    return replace(a, images=torch.cat([a.images, b.images]), image_sizes=torch.cat([a.image_sizes, b.image_sizes]),
                   orig_sizes=torch.cat([a.orig_sizes, b.orig_sizes]), text=text, targets=targets,
                   phrase_maps=[pad(m, T, 1) for m in a.phrase_maps + b.phrase_maps],
                   phrase_names=a.phrase_names + b.phrase_names, phrase_labels=a.phrase_labels + b.phrase_labels,
                   box_phrases=a.box_phrases + b.box_phrases, ids=a.ids + b.ids, kinds=a.kinds + b.kinds,
                   sources=a.sources + b.sources, captions=a.captions + b.captions, meta=a.meta + b.meta)


def test_two_nodes_on_cpu_shard_agree_checkpoint_and_resume(tmp_path, synthetic_shards):
    cfg = recipe(tmp_path, synthetic_shards, STEPS)
    trace, run = tmp_path / "trace", tmp_path / "run"
    res = launch_pair(cfg)
    for rc, o, e in res:
        assert rc == 0, e[-4000:]

    # -- each rank read its own shards --------------------------------------------------------------------------
    t0, t1 = read_trace(trace, 0), read_trace(trace, 1)
    assert len(t0) == len(t1) == STEPS
    assert {r["world_size"] for r in t0 + t1} == {2} and {r["node_rank"] for r in t1} == {1}
    owner = shard_of(synthetic_shards)
    shards0 = {(s, owner[i]) for r in t0 for s, i in zip(r["sources"], r["ids"])}
    shards1 = {(s, owner[i]) for r in t1 for s, i in zip(r["sources"], r["ids"])}
    assert shards0 and shards1 and not shards0 & shards1, (shards0, shards1)
    ids0 = {i for r in t0 for i in r["ids"]}
    assert not ids0 & {i for r in t1 for i in r["ids"]}

    # -- the DDP step equals one process on the same global batch (both ranks' first batches merged) -------------
    f0 = torch.load(trace / "first-rank0.pt", weights_only=False)
    f1 = torch.load(trace / "first-rank1.pt", weights_only=False)
    # DDP synchronised the gradients: both ranks hold the same (averaged) gradient
    assert f0["grad_norm"] == pytest.approx(f1["grad_norm"], rel=1e-6)
    from glip_pl.lit.callbacks import disable_dropout
    from glip_pl.lit.module import GLIPLitModule

    torch.manual_seed(0)
    single = GLIPLitModule(preset="tiny", lr=0.001, lang_lr=0.001, warmup_steps=2)
    single.load_state_dict(f0["state_dict"])
    assert disable_dropout(single) > 0  # as BatchTrace(disable_dropout=True) did in the DDP run
    merged = merge_batches(f0["batch"], f1["batch"])
    single.train()
    outputs = single(merged)
    loss = single.model.criterion.total(single.model.loss(outputs, merged.targets))
    loss.backward()
    loss = loss.detach()
    # each rank's loss is its sum over the rank-averaged positive count, so the mean of the two equals the loss of
    # one process on both batches; float32 sums in another order: relative tolerance 1e-4
    assert float(loss) == pytest.approx((f0["loss"] + f1["loss"]) / 2, rel=1e-4)
    grads = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
    assert set(grads) == set(f0["grads"])
    g_single = torch.cat([grads[n].flatten() for n in sorted(grads)])
    g_ddp = torch.cat([f0["grads"][n].flatten() for n in sorted(grads)])
    assert torch.allclose(g_single, g_ddp, rtol=1e-3, atol=1e-6), float((g_single - g_ddp).abs().max())
    assert float(g_single.norm()) == pytest.approx(f0["grad_norm"], rel=1e-4)

    # -- rank 0 wrote the checkpoint ----------------------------------------------------------------------------
    ckdir = run / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    ck = torch.load(ckdir / "last.ckpt", weights_only=True)
    assert ck["global_step"] == STEPS
    assert ck["GroundingDataModule"]["train_loader"]["rank"] == 0  # the data position of rank 0
    assert (run / "config.yaml").exists()

    # -- the pair resumes from it --------------------------------------------------------------------------------
    res = launch_pair(cfg, "--trainer.max_steps", str(RESUMED_STEPS))
    for rc, o, e in res:
        assert rc == 0, e[-4000:]
        assert "resuming from" in e  # both ranks found last.ckpt (shared run directory)
    assert "Restored all states" in res[0][1] + res[0][2]  # Lightning says so on rank 0
    ck = torch.load(ckdir / "last.ckpt", weights_only=True)
    assert ck["global_step"] == RESUMED_STEPS
    t0b, t1b = read_trace(trace, 0)[STEPS:], read_trace(trace, 1)[STEPS:]
    assert len(t0b) == len(t1b) == RESUMED_STEPS - STEPS
    assert [r["global_step"] for r in t0b] == list(range(STEPS + 1, RESUMED_STEPS + 1))
    # the resumed ranks continue with unseen samples, still on their own shards
    assert not {i for r in t0b for i in r["ids"]} & ids0
    assert not {i for r in t0b for i in r["ids"]} & {i for r in t1b for i in r["ids"]}
