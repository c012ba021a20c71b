"""Checkpoints that survive preemption: atomic writes, validity checks at resume, keep-last-K, signal handling,
and the RNG state that makes a resumed run draw what an uninterrupted one would."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from typing import Optional, Sequence

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from glip_pl.checkpoints import checkpoint_problem


def set_aside(path: str) -> Optional[str]:
    """``<path>.corrupt-<time>``: kept, but no ``*.ckpt`` a resume would pick; None if another rank moved it."""
    dest = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 0
    while os.path.exists(dest):
        n += 1
        dest = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        return None
    return dest


def find_resume_checkpoint(dirpath: str, verbose: bool = True, move_bad: bool = False) -> Optional[str]:
    """The newest valid ``*.ckpt`` in ``dirpath`` (``last.ckpt`` first among equals), or None.

    Newer invalid ones (a write cut by the kill, a full disk) are reported and passed over. ``move_bad`` sets them
    aside, so the new run writes ``last.ckpt`` again rather than ``last-v1.ckpt`` beside the bad one.
    """
    if not dirpath or not os.path.isdir(dirpath):
        return None
    cands = [p for p in glob.glob(os.path.join(dirpath, "*.ckpt"))]
    cands.sort(key=lambda p: (os.path.getmtime(p), os.path.basename(p) == "last.ckpt"), reverse=True)
    bad = []
    found = None
    for p in cands:
        why = checkpoint_problem(p)
        if why is None:
            found = p
            break
        bad.append((p, why))
    for p, why in bad:
        moved = set_aside(p) if move_bad else None
        then = (f"resuming from the previous valid one, {found}" if found else
                "no earlier valid checkpoint here: this run starts from step 0")
        msg = (f"[glip_pl] skipping invalid checkpoint {p} ({why})"
               f"{'; moved aside to ' + moved if moved else ''}; {then}")
        warnings.warn(msg, stacklevel=2)
        if verbose:
            print(msg, file=sys.stderr)
    return found


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _replace(tmp: str, final: str) -> None:
    """Rename ``tmp`` over ``final`` (files atomically; a directory by swapping it in)."""
    if os.path.isdir(tmp):
        old = final + ".old"
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        _fsync(tmp)
        os.replace(tmp, final)
    _fsync(os.path.dirname(os.path.abspath(final)))


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose files appear complete or not at all; ``keep_last`` newest step checkpoints kept.

    Args:
        keep_last: step checkpoints kept besides ``last.ckpt`` (``save_top_k > 1`` needs a monitor in Lightning).
        *args: Lightning's ``ModelCheckpoint`` arguments.
        **kwargs: Lightning's ``ModelCheckpoint`` arguments.
    """

    def __init__(self, *args, keep_last: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.keep_last = keep_last

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        tmp = filepath + ".tmp"
        if trainer.is_global_zero and os.path.isdir(tmp):
            shutil.rmtree(tmp)
        trainer.save_checkpoint(tmp, self.save_weights_only)  # every rank; ends with a barrier
        if trainer.is_global_zero:
            _replace(tmp, filepath)
        trainer.strategy.barrier("AtomicModelCheckpoint.rename")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            self._prune()
            from weakref import proxy

            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_train_end(self, trainer, pl_module) -> None:
        """The final step is always in ``last.ckpt`` (not only the last multiple of ``every_n_train_steps``)."""
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step and not trainer.sanity_checking:
            self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            self._save_checkpoint(trainer, self.last_model_path)

    def _prune(self) -> None:
        if not self.keep_last or not self.dirpath:
            return
        last = self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
        steps = [p for p in glob.glob(os.path.join(self.dirpath, "*" + self.FILE_EXTENSION))
                 if os.path.basename(p) != last]
        steps.sort(key=os.path.getmtime)
        for p in steps[: max(len(steps) - self.keep_last, 0)]:
            if p == self.best_model_path:
                continue
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            self.best_k_models.pop(p, None)


def atomic_save(trainer, filepath: str) -> None:
    """``trainer.save_checkpoint`` through a temporary name (for saves outside a ModelCheckpoint)."""
    tmp = filepath + ".tmp"
    trainer.save_checkpoint(tmp)
    if trainer.is_global_zero:
        _replace(tmp, filepath)
    trainer.strategy.barrier("atomic_save")


class PreemptionCheckpoint(Callback):
    """On SIGTERM/SIGUSR1: finish the current step, write ``last.ckpt`` (atomically), stop; requeue under Slurm.

    All ranks decide together (a max-reduce of the flag each step), so a signal that reaches one node first
    still gives one consistent checkpoint. DataLoader workers forked from the trainer keep the default action.

    Args:
        signals: the signals that save and stop (names or numbers).
        requeue: under Slurm, requeue the job after saving (``scontrol requeue``).
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1"), requeue: bool = True):
        self.signals = [getattr(signal, s) if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.requeue = requeue
        self.received: Optional[int] = None
        self._pid: Optional[int] = None
        self._previous: dict = {}
        self.saved_path: Optional[str] = None

    def _handler(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # a forked data worker (Slurm signals every process of the step); one that died of SIGUSR1 would crash
            # the loader before the trainer reaches the step boundary
            if signum == signal.SIGUSR1:
                signal.signal(signum, signal.SIG_IGN)
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.received is None:
            print(f"[glip_pl] received {signal.Signals(signum).name}: checkpointing at the end of this step",
                  file=sys.stderr, flush=True)
        self.received = int(signum)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._pid = os.getpid()
        # Lightning's Slurm handler saves inside the signal handler, in every process, mid-collective: DDP jobs
        # hang (Lightning #21406). This callback saves at the step boundary instead.
        env = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(env, SLURMEnvironment):
            env.auto_requeue = False
        self._install()

    def on_fit_start(self, trainer, pl_module) -> None:
        # Lightning registers its handlers after ``setup`` and chains SIGTERM to a notifier that makes DDP ranks
        # exit at the next step start without a checkpoint; the signals this callback handles are its own.
        self._install()

    def _install(self) -> None:
        for s in self.signals:
            try:
                previous = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook runner): nothing to install
                continue
            self._previous.setdefault(s, previous)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for s, h in self._previous.items():
            try:
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self._previous = {}

    def _agreed(self, trainer) -> bool:
        flag = self.received is not None
        if trainer.world_size > 1:
            t = torch.tensor(float(flag), device=trainer.strategy.root_device)
            flag = bool(trainer.strategy.reduce(t, reduce_op="max") > 0)
        return flag

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._agreed(trainer):
            return
        path = self.last_path(trainer)
        # set first: a resumed ModelCheckpoint would otherwise see last.ckpt as somebody else's and write last-v1.ckpt
        for c in trainer.checkpoint_callbacks:
            if isinstance(c, ModelCheckpoint) and c.save_last and c.dirpath \
                    and os.path.realpath(c.dirpath) == os.path.realpath(os.path.dirname(path)):
                c.last_model_path = path
        ck = next((c for c in trainer.checkpoint_callbacks if isinstance(c, AtomicModelCheckpoint)), None)
        if ck is not None:
            ck._save_checkpoint(trainer, path)
        else:
            atomic_save(trainer, path)
        self.saved_path = path
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        if trainer.is_global_zero:
            print(f"[glip_pl] preempted ({name}) after step {trainer.global_step}: saved {path}; "
                  f"run the same command again to resume", file=sys.stderr, flush=True)
            self._requeue()
        trainer.should_stop = True

    @staticmethod
    def last_path(trainer) -> str:
        ck = trainer.checkpoint_callback
        d = getattr(ck, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, "last.ckpt")

    def _requeue(self) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if not self.requeue or not job:
            return
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        try:
            r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            print(f"[glip_pl] scontrol requeue {job}: rc {r.returncode} {r.stderr.strip()}", file=sys.stderr)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"[glip_pl] could not requeue Slurm job {job}: {e}", file=sys.stderr)


def save_rng_state(checkpoint: dict, trainer=None) -> None:
    """Global RNG states as plain types and tensors (loads with ``weights_only=True``). Lightning writes rank 0's
    dict only, so every rank's state goes along in ``by_rank``: a collective, call it on every rank."""
    import random

    import numpy as np

    st = np.random.get_state()
    py = random.getstate()
    mine = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [st[0], torch.from_numpy(st[1].astype("int64")), int(st[2]), int(st[3]), float(st[4])],
    }
    checkpoint["glip_pl_rng"] = dict(mine)
    if trainer is not None and trainer.world_size > 1:
        from glip_pl.distributed import gather_objects, is_dist

        if is_dist():
            checkpoint["glip_pl_rng"]["by_rank"] = gather_objects([mine])


def load_rng_state(checkpoint: dict, trainer=None) -> bool:
    """This rank's own state when the world size is unchanged; False when the checkpoint carries none."""
    st = checkpoint.get("glip_pl_rng")
    if not st:
        return False
    import random

    import numpy as np

    by_rank = st.get("by_rank")
    if by_rank and trainer is not None and len(by_rank) == trainer.world_size:
        st = {**st, **by_rank[trainer.global_rank]}
    torch.set_rng_state(st["torch"])
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype("uint32"), n[2], n[3], n[4]))
    return True
