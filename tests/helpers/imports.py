"""Which modules a piece of code pulls in, measured in a fresh interpreter (this process has imported everything)."""

from __future__ import annotations

import json
import subprocess
import sys

TRAINING_STACK = ("lightning", "pytorch_lightning", "deepspeed")


def imported_after(code: str, top_level: tuple = TRAINING_STACK, prefixes: tuple = ()) -> list:
    """Modules loaded after running ``code`` whose top-level package is in ``top_level`` or whose name starts with one
    of ``prefixes``; the code's own failure is an AssertionError with its output."""
    probe = (f"{code}\nimport sys, json\n"
             f"print(json.dumps([k for k in sys.modules if k.split('.')[0] in {tuple(top_level)!r}"
             f" or k.startswith({tuple(prefixes)!r})]))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])
