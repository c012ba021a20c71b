"""What ``glip-pl fit`` prints: a progress bar counted in optimiser steps, a model summary without Lightning's
empty FLOPs column, and the library notices that say nothing about the run silenced, each matched on its message
and emitting module so that any other warning still shows.
"""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBar
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

# Lightning 2.6 builds torch's deprecated ``LeafSpec()`` for every non-container batch (Lightning #21326)
LEAFSPEC_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LEAFSPEC_MODULE = r"lightning\.pytorch\.utilities\._pytree"
# Lightning 2.6 advertises litlogger whenever no LitLogger is configured (logger_connector.configure_logger).
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
# ModelCheckpoint warns about a non-empty directory at every fit; on a resume it holds this run's own checkpoints.
CKPT_DIR_MESSAGE = r"Checkpoint directory .* exists and is not empty"
CKPT_DIR_MODULE = r"lightning\.pytorch\.callbacks\.model_checkpoint"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_library_notices() -> None:
    """Silence the LeafSpec deprecation and the litlogger tip (once per process)."""
    from lightning_utilities.core import rank_zero

    warnings.filterwarnings("ignore", message=LEAFSPEC_MESSAGE, category=FutureWarning, module=LEAFSPEC_MODULE)
    log = rank_zero.log  # the logger Lightning's rank_zero_info writes to
    if not any(isinstance(f, _DropMessage) and f.prefix == LITLOGGER_TIP for f in log.filters):
        log.addFilter(_DropMessage(LITLOGGER_TIP))


def resuming() -> None:
    """A fit that resumes: ModelCheckpoint's non-empty directory warning is about this run's own checkpoints.

    For the rest of the process (one fit), not undone by ``catch_warnings``: restoring the filters would make
    Python show again every warning it had already shown once."""
    warnings.filterwarnings("ignore", message=CKPT_DIR_MESSAGE, module=CKPT_DIR_MODULE)


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counted in optimiser steps out of ``max_steps`` when the run is limited by steps.

    Lightning's bar counts batches of the current epoch and titles it ``Epoch e/max_epochs-1``, which reads
    ``Epoch 0/-2`` for a step-limited run (``max_epochs=-1``) and ``6/1`` after a resume."""

    @staticmethod
    def by_steps(trainer) -> bool:
        return trainer.max_epochs == -1 and (trainer.max_steps or -1) > 0

    @property
    def total_train_batches(self):
        return self.trainer.max_steps if self.by_steps(self.trainer) else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self.by_steps(self.trainer):
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch}, step"
        return f"{text:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.by_steps(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class ParamsSummary(ModelSummary):
    """Lightning's model summary without the FLOPs column and total: Lightning counts FLOPs only by running the
    module's ``example_input_array``, which GLIPLitModule has not (an input needs an image size and a prompt), so
    both read 0."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        columns = [c for c in summary_data if c[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        table = table.rsplit("\n", 1)[0]  # the last line is "Total Flops"
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("\n" + table)


def use_console_callbacks(trainer) -> None:
    """Swap Lightning's default progress bar and model summary, not ones a recipe configured."""
    for i, cb in enumerate(trainer.callbacks):
        if type(cb) is RichProgressBar:
            trainer.callbacks[i] = StepProgressBar(refresh_rate=cb.refresh_rate, leave=cb._leave, theme=cb.theme,
                                                   console_kwargs=cb._console_kwargs)
        elif type(cb) in (ModelSummary, RichModelSummary):
            trainer.callbacks[i] = ParamsSummary(max_depth=cb._max_depth)
