"""One job per output directory: ``glip-pl fit`` on a run directory, ``glip-pl pseudo-label`` on its output folder.

Two jobs on one directory overwrite each other's ``last.ckpt`` (or shards) and share one W&B run id. The first
(rank 0 only) takes ``<dir>/glip_pl.lock``, a JSON file naming the holder, created atomically by a hard link that
fails if it exists. A second job is refused with a message naming the holder, unless the lock is stale (this host,
pid gone: SIGKILL, OOM killer), a Slurm requeue of the same job (the old allocation is gone) or our own. A holder
on another host cannot be checked from here: the message says to delete the lock file if that job is gone.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = "glip_pl.lock"


class RunLockHeld(RuntimeError):
    """Another live job holds the directory's lock (the message names it)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """``with RunLock(run_dir, "glip-pl fit"):`` — or ``acquire()`` / ``release()``; released at exit as well."""

    def __init__(self, directory, command: str = "glip_pl"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.command = command
        self._mine: Optional[str] = None

    def _info(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "command": self.command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "token": secrets.token_hex(8)}

    def holder(self) -> Optional[dict]:
        """The current holder's record, None when unlocked; ``{"unreadable": text}`` for a damaged file."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(text)
            if not isinstance(rec, dict):
                raise ValueError
            return rec
        except ValueError:
            return {"unreadable": text[:200]}

    def describe(self, rec: dict) -> str:
        if "unreadable" in rec:
            return f"an unreadable lock file {self.path} ({rec['unreadable']!r})"
        job = f", Slurm job {rec['slurm_job_id']}" if rec.get("slurm_job_id") else ""
        return (f"{rec.get('command', 'a glip_pl job')} on host {rec.get('host')}, pid {rec.get('pid')}{job}, "
                f"since {rec.get('started')}")

    def _why_not_take(self, rec: dict) -> Optional[str]:
        """None when ``rec``'s holder may be replaced, else why not."""
        if "unreadable" in rec:
            return "its lock file cannot be read"
        here = rec.get("host") == socket.gethostname()
        pid = rec.get("pid")
        job = os.environ.get("SLURM_JOB_ID")
        if job and rec.get("slurm_job_id") == job:
            return None
        if here and pid == os.getpid():
            return None
        if here and isinstance(pid, int) and not _pid_alive(pid):
            return None
        return "it is running" if here else "it runs on another host, which cannot be checked from here"

    def _create(self, text: str) -> bool:
        tmp = self.path.with_name(f".{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}.tmp")
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create (a reader may briefly see it empty)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _remove_stale(self, rec: dict) -> None:
        """Move the stale lock out of the way, unless another job replaced it meanwhile (then it is put back)."""
        aside = self.path.with_name(f".{LOCK_NAME}.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if json.loads(aside.read_text()) != rec:
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
        except ValueError:
            pass
        aside.unlink(missing_ok=True)

    def acquire(self) -> "RunLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        info = self._info()
        text = json.dumps(info, indent=1) + "\n"
        for _ in range(20):
            if self._create(text):
                self._mine = info["token"]
                atexit.register(self.release)
                return self
            rec = self.holder()
            if rec is None:  # released between the two calls
                continue
            why = self._why_not_take(rec)
            if why is not None:
                raise RunLockHeld(
                    f"{self.directory} is in use by {self.describe(rec)}; {why}. Two jobs on one directory would "
                    f"overwrite each other's files. Wait for it, or use another directory; if that job is gone, "
                    f"delete {self.path}.")
            self._remove_stale(rec)
        raise RunLockHeld(f"could not take {self.path}: other jobs keep taking it")

    def release(self) -> None:
        """Only if it is still ours: a Slurm requeue may have taken it over."""
        if self._mine is None:
            return
        rec = self.holder()
        if rec and rec.get("token") == self._mine:
            self.path.unlink(missing_ok=True)
        self._mine = None
        try:
            atexit.unregister(self.release)
        except Exception:
            pass

    @property
    def held(self) -> bool:
        return self._mine is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
