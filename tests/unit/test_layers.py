"""The layering in pyproject.toml's [tool.importlinter] holds, a violation breaks it, and no
module of ``outbox`` imports itself through a cycle.

The contracts run here (so CI, which runs the tests, runs them) and in ``./dev lint``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_import_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


#: (module to edit, the line added, the contract that must break)
VIOLATIONS = [
    ("store/__init__.py", "import grpc", "The store never knows gRPC"),
    ("store/__init__.py", "from outbox import policy", "The store never knows gRPC"),
    ("dispatcher.py", "import sqlalchemy", "never write SQL"),
    ("policy.py", "import sqlalchemy", "The pure core"),
    ("health.py", "import prometheus_client", "The pure core"),
    ("store/__init__.py", "from outbox import cli", "Layers"),
    ("dispatcher.py", "from outbox import daemon", "Layers"),
    ("writer.py", "from opentelemetry import trace", "Only outbox.tracing imports OpenTelemetry"),
]


@pytest.mark.parametrize(("module", "line", "contract"), VIOLATIONS)
def test_a_deliberate_violation_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    skip = shutil.ignore_patterns("_migrations", "_protos", "_data", "__pycache__")
    shutil.copytree(ROOT / "outbox", tmp_path / "outbox", ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "outbox" / module
    target.write_text(target.read_text() + f"\n{line}  # deliberate violation\n")

    result = lint_imports(tmp_path, pythonpath=tmp_path)

    assert result.returncode != 0, result.stdout
    broken = [ln for ln in result.stdout.splitlines() if " BROKEN" in ln]  # "(1 ignored …)"
    assert any(contract in ln for ln in broken), result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[tuple[str, str]]:
    """Each direct import ``a -> b`` for which ``b`` also reaches ``a``: the edges of cycles."""
    modules = [m for m in graph.modules if m.startswith("outbox")]
    return sorted(
        (a, b)
        for a in modules
        for b in graph.find_modules_directly_imported_by(a)
        if b.startswith("outbox") and graph.chain_exists(importer=b, imported=a)
    )


def test_no_module_imports_itself_through_a_cycle() -> None:
    graph = grimp.build_graph("outbox")
    # A package's __init__ importing its own submodules is not a cycle of responsibilities.
    for package in ("outbox",):
        for child in list(graph.find_modules_directly_imported_by(package)):
            graph.remove_import(importer=package, imported=child)
    assert _cycles(graph) == []
