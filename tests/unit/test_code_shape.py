"""Short functions: none in ``outbox/`` is over 40 lines (ruff's mccabe keeps each at
complexity 10 or less; see [tool.ruff.lint.mccabe] in pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "outbox"
MAX_LINES = 40


def function_lengths(root: Path) -> list[tuple[int, str]]:
    """(lines, "path:line name") for every function and method under ``root``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                found.append((lines, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return found


def test_no_function_in_the_package_is_over_40_lines() -> None:
    too_long = sorted(f for f in function_lengths(PACKAGE) if f[0] > MAX_LINES)
    assert not too_long, f"split these (lines, where): {too_long}"


def test_the_measure_counts_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n")
    assert function_lengths(tmp_path) == [(MAX_LINES + 1, "m.py:1 long")]
