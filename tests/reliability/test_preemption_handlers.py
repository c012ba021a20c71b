"""The preemption callback owns the signals: Lightning's in-handler Slurm checkpointing is switched off, forked data
workers survive the SIGUSR1 warning (Slurm signals every process of the step) but still die of SIGTERM, and
``glip-pl fit`` adds the callback when a recipe does not list it."""

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer

from glip_pl.lit.checkpointing import PreemptionCheckpoint
from glip_pl.lit.cli import GLIPCLI
from glip_pl.lit.datamodule import GroundingDataModule
from glip_pl.lit.module import GLIPLitModule

ROOT = Path(__file__).resolve().parents[2]


def test_setup_switches_off_lightnings_slurm_requeue_and_restores_handlers():
    env = SLURMEnvironment()
    assert env.auto_requeue
    cb = PreemptionCheckpoint()
    before = {s: signal.getsignal(s) for s in cb.signals}
    trainer = SimpleNamespace(strategy=SimpleNamespace(cluster_environment=env))
    cb.setup(trainer, None, "fit")
    try:
        assert env.auto_requeue is False
        assert all(signal.getsignal(s) == cb._handler for s in cb.signals)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as if Lightning had chained its own handler
        cb.on_fit_start(trainer, None)
        assert signal.getsignal(signal.SIGTERM) == cb._handler
    finally:
        cb.teardown(trainer, None, "fit")
    assert {s: signal.getsignal(s) for s in cb.signals} == before


def test_forked_worker_ignores_the_warning_and_dies_of_sigterm():
    cb = PreemptionCheckpoint()
    cb.setup(SimpleNamespace(strategy=SimpleNamespace()), None, "fit")
    try:
        pid = os.fork()
        if pid == 0:  # the "data worker": inherits the handler, has another pid
            try:
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
            finally:
                os._exit(7)  # reached only if SIGTERM did not kill us
        _, status = os.waitpid(pid, 0)
    finally:
        cb.teardown(None, None, "fit")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
    assert cb.received is None  # the trainer process was not told to stop


class NoRun(GLIPCLI):
    def _run_subcommand(self, subcommand: str) -> None:  # everything `glip-pl fit` builds, without fitting
        pass


def test_fit_adds_the_callback_once_unless_told_not_to(synthetic_shards, tmp_path):
    def trainer(*extra) -> Trainer:
        args = ["fit", "--config", str(ROOT / "recipes/local/cpu_smoke.yaml"), "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}", f'--data.train=[{{"urls": "{synthetic_shards}/detection"}}]',
                "--data.val=[]", *extra]
        return NoRun(GLIPLitModule, GroundingDataModule, args=args).trainer

    # cpu_smoke lists one: not duplicated
    assert sum(isinstance(c, PreemptionCheckpoint) for c in trainer().callbacks) == 1
    # a recipe without one gets it
    no_cb = ["--trainer.callbacks=[]"]
    assert sum(isinstance(c, PreemptionCheckpoint) for c in trainer(*no_cb).callbacks) == 1
    assert not any(isinstance(c, PreemptionCheckpoint)
                   for c in trainer(*no_cb, "--preemption_checkpoint=false").callbacks)
