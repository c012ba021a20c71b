"""Test-wide settings: never touch the network, keep CPU threads bounded, make runs repeatable."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny CPU models are dominated by per-op overhead: one thread is ~25x faster than two on a busy 2-core box.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _own_wandb_service_per_process():
    """An in-process ``wandb.init`` starts a W&B service and exports its address as WANDB_SERVICE; subprocesses
    started afterwards (``glip-pl fit``, sbatch jobs) would then share this process's service, which refuses to
    resume a run id it still holds ("run ID ... is in use"). Every test leaves the environment as it found it."""
    before = os.environ.get("WANDB_SERVICE")
    yield
    if os.environ.get("WANDB_SERVICE") != before:
        import wandb

        wandb.teardown()
        if before is None:
            os.environ.pop("WANDB_SERVICE", None)
        else:
            os.environ["WANDB_SERVICE"] = before


@pytest.fixture(scope="session")
def tokenizer():
    from glip_pl.model.language import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """<root>/{detection,grounding,caption}/{train,val}-%06d.tar: 96 train (6 shards) + 32 val (2 shards) each."""
    from glip_pl.data.synthetic import generate_synthetic

    root = str(tmp_path_factory.mktemp("synthetic"))
    generate_synthetic(root, splits={"train": 96, "val": 32}, seed=0, samples_per_shard=16, num_workers=2,
                       progress=False)
    return root


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory, synthetic_shards):
    """(folder, last.ckpt) of one tiny model pre-trained through ``glip-pl fit`` on the synthetic shards
    (tests/helpers/pretrained.py): the transfer tests fine-tune it, the pseudo-label quality test labels with it."""
    from helpers.pretrained import pretrain

    tmp = tmp_path_factory.mktemp("pretrained_tiny")
    return tmp, pretrain(tmp, synthetic_shards)
