"""``./dev``: an old Python is refused in one line before pip runs; an unknown task fails."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DEV = Path(__file__).resolve().parents[2] / "dev"
OLD_PYTHON = """#!/bin/sh
# Stands in for Ubuntu 22.04's python3 (3.10): the version checks are all it answers.
case "$2" in
  *version_info*) exit 1 ;;
  *python_version*) echo 3.10.12 ;;
  *) echo "unexpected: $*" >&2; exit 99 ;;
esac
"""


def dev_copy(tmp_path: Path) -> Path:
    """The script in an empty directory: its .venv would be made there, not in the checkout."""
    copy = tmp_path / "dev"
    shutil.copy(DEV, copy)
    return copy


def run(dev: Path, *args: str, python: str = "python3") -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": python}
    return subprocess.run(
        [str(dev), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_python_older_than_3_11_is_refused_in_one_line(tmp_path: Path) -> None:
    old = tmp_path / "python3.10"
    old.write_text(OLD_PYTHON)
    old.chmod(0o755)
    dev = dev_copy(tmp_path)
    for task in ("demo", "test", "venv"):
        done = run(dev, task, python=str(old))
        assert done.returncode == 1, done
        [line] = done.stderr.splitlines()
        assert "needs Python 3.11 or newer" in line and "3.10.12" in line, line
        assert "PYTHON=python3.11 ./dev " + task in line, line
    assert not (tmp_path / ".venv").exists()


def test_unknown_task_fails_and_help_still_works(tmp_path: Path) -> None:
    dev = dev_copy(tmp_path)
    done = run(dev, "tset")
    assert done.returncode == 2
    assert "unknown task 'tset'" in done.stderr and "./dev test" in done.stderr
    helped = run(dev, "help")
    assert helped.returncode == 0 and "./dev lint" in helped.stdout
    assert run(dev).returncode == 0  # no task: the list
