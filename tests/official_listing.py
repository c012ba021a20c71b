"""Reads the official state-dict listings shipped in tests/fixtures/official (measured from the official build)."""

from __future__ import annotations

import re
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"


def read_listing(file: str) -> dict:
    """{official key: shape list} for every entry of a listing (e.g. ``glip_t_state_dict.txt``)."""
    path = FIXTURES / file
    assert path.exists(), f"reference listing {path} is missing from the repository"
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        out[key] = [int(s) for s in re.findall(r"\d+", shape)]
    return out


def official_block(file: str, index: int) -> dict:
    """{name below ``rpn.head.dyhead_tower.{index}.``: shape}."""
    prefix = f"rpn.head.dyhead_tower.{index}."
    out = {k[len(prefix):]: v for k, v in read_listing(file).items() if k.startswith(prefix)}
    assert out, f"no {prefix} keys in {file}"
    return out
