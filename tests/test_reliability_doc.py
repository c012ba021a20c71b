"""docs/reliability.md stays true to the suite: every row names a test, and every test it names exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_row_names_tests_that_exist():
    doc = (REPO / "docs" / "reliability.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith("| fault")
            and not set(line) <= set("|- ")]
    assert len(rows) >= 25
    for row in rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", row)
        assert refs, f"a row without a test: {row[:80]}"
        for path, name in refs:
            src = (REPO / path).read_text()
            assert not name or f"def {name}(" in src, f"{path}::{name} (named in docs/reliability.md) is gone"
        for name in re.findall(r"`(test_\w+)`", row):  # short names refer to the row's last named file
            assert any(f"def {name}(" in (REPO / p).read_text() for p, _ in refs), name
