"""Learning-rate schedules of GLIPLitModule: the pretraining step/cosine/constant lambdas and the official
fine-tune's auto-step (``schedule: autostep``, ``WarmupReduceLROnPlateau`` of the official code)."""

import math

import pytest
import torch

from glip_pl.lit.module import GLIPLitModule
from glip_pl.model.types import GLIPInputError


def lam(**kw):
    lit = GLIPLitModule(preset="tiny", **kw)
    return lit, lit._lr_lambda(100)


def test_step_cosine_constant_lambdas():
    _, f = lam(schedule="step", warmup_steps=10, warmup_factor=0.001, milestones=(0.5, 0.8), gamma=0.1)
    assert f(0) == pytest.approx(0.001) and f(5) == pytest.approx(0.5005) and f(10) == 1.0
    assert f(49) == 1.0 and f(50) == pytest.approx(0.1) and f(80) == pytest.approx(0.01)
    _, f = lam(schedule="cosine", warmup_steps=0)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
    _, f = lam(schedule="constant", warmup_steps=0)
    assert f(0) == f(99) == 1.0
    with pytest.raises(GLIPInputError, match="schedule must be one of"):
        GLIPLitModule(preset="tiny", schedule="linear")
    with pytest.raises(GLIPInputError, match="autostep_patience"):
        GLIPLitModule(preset="tiny", schedule="autostep", autostep_patience=0)


def test_autostep_follows_the_official_plateau_rule():
    """Official WarmupReduceLROnPlateau (mode max, absolute threshold 1e-4, cooldown 1, patience 3): the first
    validation is under cooldown; three validations without a gain of more than 1e-4 decay the lr by gamma, then
    one validation of cooldown."""
    lit, f = lam(schedule="autostep", warmup_steps=0, gamma=0.1, autostep_patience=3)
    aps = [0.10, 0.20, 0.20005, 0.19, 0.15, 0.25, 0.25, 0.25, 0.25, 0.24, 0.24, 0.24, 0.24]
    decayed = [lit.autostep_update(a) for a in aps]
    # 0.20 best; 0.20005 (+5e-5), 0.19, 0.15 = three bad -> decay at index 4; cooldown eats index 5's count (0.25 is
    # a new best anyway); 0.25 x3 bad -> decay at index 8; index 9 under cooldown; 0.24 x3 bad -> decay at 12
    assert [i for i, d in enumerate(decayed) if d] == [4, 8, 12]
    assert lit.autostep_state["stage"] == 3 and lit.autostep_state["best"] == 0.25
    assert f(1000) == pytest.approx(1e-3)  # gamma ** 3


def test_autostep_in_a_fit_decays_the_optimizer_lr_and_resumes_its_state(tmp_path, synthetic_shards, monkeypatch):
    """A real fit validating every 2 steps with a scripted AP: the optimiser's lr drops by gamma after the plateau,
    the checkpoint carries the plateau state, and a resumed module continues from it."""
    import lightning as L

    import glip_pl.lit.metrics as metrics
    from glip_pl.lit.datamodule import GroundingDataModule

    scripted = iter([0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # best 0.1 under cooldown, then 2 bad -> decay after val 3
    # box_ap's full result: the size and recall figures are COCO's -1 (none of that size), which are not logged
    monkeypatch.setattr(metrics, "box_ap", lambda gt, dt, **kw: {"AP": next(scripted), "AP50": 0.0, "AP75": 0.0,
                                                                 "APs": -1.0, "APm": -1.0, "APl": -1.0, "AR100": -1.0})
    dm = GroundingDataModule(train=[{"urls": f"{synthetic_shards}/detection"}],
                             val=[{"urls": f"{synthetic_shards}/detection", "split": "val"}], batch_size=2,
                             num_workers=0, train_min_sizes=(128,), train_max_size=160, val_size=128,
                             val_max_size=160)
    lit = GLIPLitModule(preset="tiny", lr=1e-3, lang_lr=1e-3, warmup_steps=0, schedule="autostep",
                        autostep_patience=2, gamma=0.1)
    lrs = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(accelerator="cpu", max_steps=8, val_check_interval=2, check_val_every_n_epoch=None,
                        limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()])
    trainer.fit(lit, datamodule=dm)
    # validations after steps 2, 4, 6, 8: val 1 best (cooldown), val 2 and 3 bad -> decay before step 7
    assert lrs[:6] == [pytest.approx(1e-3)] * 6 and lrs[6:] == [pytest.approx(1e-4)] * 2, lrs
    assert lit.autostep_state["stage"] == 1
    ck = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ck)
    saved = torch.load(ck, weights_only=True)["glip_pl_autostep"]
    assert saved["stage"] == 1 and saved["best"] == pytest.approx(0.1)
    resumed = GLIPLitModule(preset="tiny", schedule="autostep", autostep_patience=2)
    resumed.on_load_checkpoint(torch.load(ck, weights_only=True))
    assert resumed.autostep_state == lit.autostep_state and not math.isinf(resumed.autostep_state["best"])
