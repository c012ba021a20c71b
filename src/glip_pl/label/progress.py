"""The labelling job's progress bar: captions (not batches) with captions/s and an ETA, on rank 0.

The total is rank 0's unfinished captions when the input folder's ``index.json`` lists its shards' counts (else the
bar counts without an ETA). Off a terminal (a Slurm log) it refreshes at most every ``log_interval_s`` seconds.
"""

from __future__ import annotations

import sys
from typing import Optional

from lightning.pytorch.callbacks import ProgressBar


class CaptionProgressBar(ProgressBar):
    def __init__(self, log_interval_s: float = 30.0):
        super().__init__()
        self.enabled, self.log_interval_s = True, log_interval_s
        self.bar = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_predict_start(self, trainer, pl_module) -> None:
        from tqdm import tqdm

        total: Optional[int] = getattr(trainer.datamodule, "captions_todo", None)
        eta = "{n_fmt}/{total_fmt} captions [{elapsed}<{remaining}, " if total else "{n_fmt} captions [{elapsed}, "
        self.bar = tqdm(total=total, desc="pseudo-label", unit=" captions", disable=not self.enabled,
                        file=sys.stderr, bar_format="{desc}: " + eta + "{rate_noinv_fmt}{postfix}]",
                        mininterval=0.1 if sys.stderr.isatty() else self.log_interval_s, dynamic_ncols=True)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.bar.update(outputs["captions"])
        self.bar.set_postfix_str(f"shard {outputs['shard']}", refresh=False)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.bar.close()

    def print(self, *args, **kwargs) -> None:
        if self.bar is not None:
            self.bar.write(" ".join(map(str, args)), file=sys.stderr)
        else:
            print(*args, **kwargs)
