"""Weights & Biases logging that never hangs and follows a run across requeues.

The run id is fixed per run directory (stored in ``<save_dir>/wandb_run_id``), so a resumed or requeued job
continues the same W&B run. Without an API key (and unless WANDB_MODE=online) the logger runs offline; sync later
with ``wandb sync <save_dir>/wandb/offline-run-*``.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Optional

from lightning.pytorch.loggers import WandbLogger

from glip_pl.distributed import launch_rank_world
from glip_pl.lit.run_dir import DEFAULT_RUN_DIR


def stable_run_id(save_dir: str) -> str:
    """The run directory's W&B id, created once (exclusive create: two writers cannot leave different ids)."""
    path = Path(save_dir) / "wandb_run_id"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x") as f:
            f.write(secrets.token_hex(4))
    except FileExistsError:
        pass
    for _ in range(50):  # another process may have created the file but not written it yet
        rid = path.read_text().strip()
        if rid:
            return rid
        time.sleep(0.1)
    raise RuntimeError(f"{path} is empty")


def launch_rank() -> int:
    """This process's global rank as the launcher tells it, before Lightning sets up distribution."""
    return launch_rank_world()[0]


def wandb_offline_by_default() -> bool:
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online":
        return False
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
    return not has_key


class GLIPWandbLogger(WandbLogger):
    """``WandbLogger`` with a per-run-directory id (resume="allow") and offline mode when no key is set."""

    def __init__(self, save_dir: Optional[str] = None, project: str = "glip_pl", name: Optional[str] = None,
                 offline: Optional[bool] = None, id: Optional[str] = None, **kwargs):
        # None: glip-pl fit fills in the run directory (glip_pl.lit.run_dir) before building the logger
        save_dir = save_dir or DEFAULT_RUN_DIR
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        run_id = id or (stable_run_id(save_dir) if launch_rank() == 0 else None)
        super().__init__(
            save_dir=save_dir, project=project, name=name, id=run_id, resume="allow",
            offline=wandb_offline_by_default() if offline is None else offline, **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:
            # Lightning always passes anonymous=None, which W&B 0.31 warns "has no effect"; unset, it says nothing
            del self._wandb_init["anonymous"]
