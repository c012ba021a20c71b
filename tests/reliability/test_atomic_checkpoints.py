"""Atomic checkpoints: written under a temporary name then renamed, keep-last-K, and a truncated or half-written
checkpoint is detected at resume and passed over (with a warning) for the previous valid one."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from glip_pl.checkpoints import checkpoint_problem
from glip_pl.lit.checkpointing import AtomicModelCheckpoint, find_resume_checkpoint


def _fit(tmp_path, steps=7, **ck):
    cb = AtomicModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1, save_last=True, **ck)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=steps, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                        limit_val_batches=0)
    seen = []
    real = trainer.save_checkpoint

    def spy(filepath, *a, **k):  # every write goes to a temporary name
        seen.append(str(filepath))
        return real(filepath, *a, **k)

    trainer.save_checkpoint = spy
    trainer.fit(BoringModel())
    return cb, seen


def test_atomic_write_keep_last_and_final_step(tmp_path):
    cb, seen = _fit(tmp_path, keep_last=2)
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"], names
    assert seen and all(s.endswith(".tmp") for s in seen), seen
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["global_step"] == 7  # the final step too
    assert all(checkpoint_problem(str(tmp_path / "ck" / n)) is None for n in names)


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_damaged_last_falls_back_to_previous(tmp_path, damage):
    _fit(tmp_path, keep_last=2)
    last = tmp_path / "ck" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"PK\x03\x04" + b"x" * 100}[damage])
    os.utime(last)  # damaged file is the newest
    (tmp_path / "ck" / "half.ckpt.tmp").write_bytes(b"half-written")  # leftovers of a kill are never picked
    with pytest.warns(UserWarning, match="skipping invalid checkpoint .*last.ckpt"):
        found = find_resume_checkpoint(str(tmp_path / "ck"))
    assert found.endswith("epoch=0-step=6.ckpt")


def test_checkpoint_needing_unpickling_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "x": Evil()}, p)
    assert "Unpickl" in checkpoint_problem(str(p)) or "weights_only" in checkpoint_problem(str(p))
    with pytest.warns(UserWarning):
        assert find_resume_checkpoint(str(tmp_path)) is None
