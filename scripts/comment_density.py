"""Comment density of Python files: (comment lines + docstring lines) / non-blank lines.

Issue 23 asks for comments that explain why; this gives the number to compare before and after a trim.
A line holding code and a trailing comment counts as code, not as a comment line.
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from pathlib import Path


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def density(source: str) -> tuple[int, int]:
    """(comment + docstring lines, non-blank lines) of one file's source."""
    non_blank = {i for i, line in enumerate(source.splitlines(), 1) if line.strip()}
    code_lines: set[int] = set()
    comment_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comment_lines.add(tok.start[0])
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    docstrings = _docstring_lines(ast.parse(source))
    explained = (comment_lines - code_lines) | (docstrings & non_blank)
    return len(explained & non_blank), len(non_blank)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="files or folders (searched for *.py)")
    parser.add_argument("--total-only", action="store_true", help="print only the total line")
    args = parser.parse_args(argv)
    files = sorted({f for p in args.paths for f in ([p] if p.is_file() else p.rglob("*.py"))})
    total_comment = total_lines = 0
    for path in files:
        comment, lines = density(path.read_text(encoding="utf-8"))
        total_comment += comment
        total_lines += lines
        if not args.total_only:
            print(f"{100 * comment / max(lines, 1):5.1f} %  {comment:5d} / {lines:5d}  {path}")
    print(f"{100 * total_comment / max(total_lines, 1):5.1f} %  {total_comment:5d} / {total_lines:5d}  "
          f"total ({len(files)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
