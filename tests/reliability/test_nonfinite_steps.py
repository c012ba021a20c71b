"""NaN/Inf loss or gradients: the step is skipped (no parameter moves) and counted; after ``max_bad_steps`` bad
steps in a row the run stops with a message naming the step and the checkpoint to resume from."""

import lightning as L
import pytest
import torch

from glip_pl.lit.checkpointing import AtomicModelCheckpoint
from glip_pl.lit.datamodule import GroundingDataModule
from glip_pl.lit.guards import NonFiniteGuard
from glip_pl.lit.module import GLIPLitModule


class Faulty(GLIPLitModule):
    def __init__(self, bad_loss=(), bad_grad=(), **kw):
        super().__init__(**kw)
        self.bad_loss, self.bad_grad = set(bad_loss), set(bad_grad)
        self.moved = {}

    def training_step(self, batch, batch_idx):
        self._before = [p.detach().clone() for p in self.parameters()]
        if batch_idx in self.bad_loss:
            crit = self.model.criterion
            total = type(crit).total
            crit.total = lambda terms: total(crit, terms) * float("nan")
            try:
                return super().training_step(batch, batch_idx)
            finally:
                del crit.total
        return super().training_step(batch, batch_idx)

    def on_after_backward(self):
        if self.trainer.fit_loop.epoch_loop.batch_idx in self.bad_grad:
            next(p for p in self.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.moved[batch_idx] = any(not torch.equal(a, p) for a, p in zip(self._before, self.parameters()))


def _fit(tmp_path, shards, steps, **kw):
    dm = GroundingDataModule(train=[{"urls": f"{shards}/detection"}], batch_size=2, num_workers=0,
                             train_min_sizes=(64,), train_max_size=96, num_negatives=4)
    model = Faulty(preset="tiny", lr=1e-3, lang_lr=1e-3, warmup_steps=1, **kw)
    ck = AtomicModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=steps, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ck],
                        limit_val_batches=0, num_sanity_val_steps=0)
    return model, trainer, dm


def test_bad_loss_and_bad_gradients_skip_the_step(tmp_path, synthetic_shards, capsys):
    model, trainer, dm = _fit(tmp_path, synthetic_shards, 4, bad_loss={1}, bad_grad={2})
    trainer.fit(model, dm)
    moved = model.moved
    assert moved[0] and not moved[1] and not moved[2] and moved[3], moved  # only the bad steps left weights alone
    out = capsys.readouterr().out
    assert "non-finite loss nan; step skipped" in out and "non-finite gradients; step skipped" in out
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert guard.bad_total == 2 and guard.bad_in_row == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_bad_steps_stop_the_run_naming_step_and_checkpoint(tmp_path, synthetic_shards):
    model, trainer, dm = _fit(tmp_path, synthetic_shards, 20, bad_loss=set(range(2, 100)), max_bad_steps=3)
    with pytest.raises(RuntimeError, match=r"3 consecutive training steps with non-finite loss .*steps 2 to 4.*"
                                           r"resume from .*ck/.*\.ckpt"):
        trainer.fit(model, dm)
