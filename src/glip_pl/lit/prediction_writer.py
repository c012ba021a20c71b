"""Where ``glip-pl predict-batch`` puts its detections: one json line per image (``GLIPLitModule.predict_step``'s
record, boxes x1, y1, x2, y2 in original pixels), one file per rank. Written at each batch's end, so a large shard
set is never held in memory and an interrupted run keeps what it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class DetectionWriter(L.Callback):
    """Appends each predicted image to ``<output_dir>/predictions-rank<R>.jsonl``.

    Args:
        output_dir: folder of the files (``glip-pl predict-batch`` default: ``<default_root_dir>/predictions``).
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.images = 0

    def path(self, trainer) -> Path:
        return Path(self.output_dir) / f"predictions-rank{trainer.global_rank}.jsonl"

    def on_predict_start(self, trainer, pl_module) -> None:
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")  # a new run replaces the previous file
        self.images = 0

    # not Lightning's BasePredictionWriter: it wants sampler indices, which a shard stream has not (records carry ids)
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        with open(self.path(trainer), "a") as f:
            for record in outputs:
                f.write(json.dumps(record) + "\n")
        self.images += len(outputs)

    def on_predict_end(self, trainer, pl_module) -> None:
        print(f"[glip_pl] predict-batch: {self.images} images -> {self.path(trainer)}", flush=True)
