"""A checkpoint that does not load (issue 21): ``--ckpt_path BAD`` is one line naming the file and why, exit 1, no
traceback, nothing unpickled; auto-resume moves a bad ``last.ckpt`` aside (``last.ckpt.corrupt-<time>``, never
deleted), says what it does instead, and the new run writes ``last.ckpt`` again (not ``last-v1.ckpt``)."""

import os
from pathlib import Path

import pytest
import torch

from helpers.cli import glip_pl
from helpers.recipe import tiny_recipe

from glip_pl.lit.checkpointing import find_resume_checkpoint


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.ckpt"
    if kind == "evil":
        torch.save({"state_dict": {}, "global_step": 1, "x": _Evil(tmp_path / "owned")}, p)
    else:
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, p)
        data = p.read_bytes()
        p.write_bytes({"truncated": data[: len(data) // 2], "empty": b""}[kind])
    return p


WHY = {"truncated": "truncated", "empty": "empty file", "evil": "needs unpickling"}


@pytest.mark.parametrize("sub", ["fit", "validate"])
@pytest.mark.parametrize("kind", ["truncated", "empty", "evil"])
def test_explicit_bad_ckpt_path_is_one_clear_line(tmp_path, synthetic_shards, sub, kind):
    from glip_pl.lit.cli import run

    cfg = tiny_recipe(tmp_path, synthetic_shards, steps=1)
    bad = _bad(tmp_path, kind)
    with pytest.raises(SystemExit) as e:
        run([sub, *cfg.args, "--ckpt_path", str(bad)])
    msg = str(e.value.code)
    assert msg.startswith(f"[glip_pl] {sub} --ckpt_path {bad}: ") and WHY[kind] in msg and "\n" not in msg, msg
    assert not (tmp_path / "owned").exists()


def test_explicit_bad_ckpt_path_from_the_command_line(tmp_path, synthetic_shards):
    """The real ``glip-pl fit`` process: exit 1, the one line on stderr, no traceback."""
    cfg = tiny_recipe(tmp_path, synthetic_shards, steps=1)
    bad = _bad(tmp_path, "evil")
    r = glip_pl("fit", *cfg.args, "--ckpt_path", str(bad), timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"[glip_pl] fit --ckpt_path {bad}: needs unpickling" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr[-3000:]
    assert not (tmp_path / "owned").exists()


def _valid(p: Path, step: int) -> None:
    torch.save({"state_dict": {}, "global_step": step}, p)


def test_bad_last_is_moved_aside_and_the_previous_one_used(tmp_path, capsys):
    _valid(tmp_path / "epoch=0-step=3.ckpt", 3)
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"PK\x03\x04" + b"x" * 100)
    os.utime(tmp_path / "epoch=0-step=3.ckpt", (1, 1))  # last.ckpt is the newest
    with pytest.warns(UserWarning, match="skipping invalid checkpoint"):
        found = find_resume_checkpoint(str(tmp_path), move_bad=True)
    assert found == str(tmp_path / "epoch=0-step=3.ckpt")
    aside = list(tmp_path.glob("last.ckpt.corrupt-*"))
    assert not last.exists() and len(aside) == 1 and aside[0].read_bytes() == b"PK\x03\x04" + b"x" * 100
    err = capsys.readouterr().err
    assert f"moved aside to {aside[0]}" in err and f"resuming from the previous valid one, {found}" in err, err
    # without move_bad (the non-finite-step report, other ranks) nothing is renamed
    last.write_bytes(b"")
    with pytest.warns(UserWarning):
        find_resume_checkpoint(str(tmp_path), verbose=False)
    assert last.exists()


def test_auto_resume_from_a_bad_last_with_nothing_before_it(tmp_path, synthetic_shards):
    """No earlier checkpoint: the run says it starts from step 0, trains, and writes last.ckpt (the bad one kept)."""
    cfg = tiny_recipe(tmp_path, synthetic_shards, steps=2, every=100)
    ckdir = tmp_path / "run" / "checkpoints"
    ckdir.mkdir(parents=True)
    (ckdir / "last.ckpt").write_bytes(b"truncated")
    r = glip_pl("fit", *cfg.args, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "moved aside to" in r.stderr and "this run starts from step 0" in r.stderr, r.stderr[-3000:]
    assert "resuming from" not in r.stderr
    aside = list(ckdir.glob("last.ckpt.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"truncated"
    assert not (ckdir / "last-v1.ckpt").exists(), sorted(os.listdir(ckdir))
    assert torch.load(ckdir / "last.ckpt", weights_only=True)["global_step"] == 2
