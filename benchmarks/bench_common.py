"""What every benchmark script records beside its figures."""

import subprocess
from pathlib import Path


def git_commit() -> str:
    """The short commit the figures were measured at ("unknown" outside a git checkout)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except Exception:
        return "unknown"
