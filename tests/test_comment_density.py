"""scripts/comment_density.py: what counts as a comment or docstring line, and what does not."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "comment_density.py"

SOURCE = '''"""Module docstring,
two lines."""

# a comment line
import os  # a trailing comment: a code line


def f(x):
    """One docstring line."""
    s = """a string that is no docstring"""

    return s


class C:
    x = 1
'''


def _load():
    spec = importlib.util.spec_from_file_location("comment_density", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_comment_and_docstring_lines_of_non_blank_lines():
    # non-blank: 2 module docstring + 1 comment + import + def + 1 docstring + s = + return + class + x = -> 10
    assert _load().density(SOURCE) == (4, 10)


def test_total_over_a_folder(tmp_path, capsys):
    (tmp_path / "a.py").write_text(SOURCE)
    (tmp_path / "b.py").write_text("x = 1\n")
    assert _load().main([str(tmp_path), "--total-only"]) == 0
    assert capsys.readouterr().out.split() == ["36.4", "%", "4", "/", "11", "total", "(2", "files)"]
