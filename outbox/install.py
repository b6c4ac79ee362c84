"""What an installed package writes for its host: a commented config and the systemd units.

The wheel carries ``config.example.toml``, ``packaging/systemd/`` and the runbook under
``outbox/_data/`` (a checkout has them at its root). ``outbox init`` writes the config,
``outbox systemd`` writes the units with the paths in use: this venv's ``outbox``, the config
file, and the installed runbook in ``Documentation=``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from outbox.config import load
from outbox.errors import ConfigError, OutboxError
from outbox.resources import _find

UNIT_NAMES = (
    "outbox.service",
    "outbox-check.service",
    "outbox-check.timer",
    "outbox-console.service",
)
#: The paths the shipped units name, replaced by the ones in use.
SHIPPED_EXECUTABLE = "/opt/outbox/.venv/bin/outbox"
SHIPPED_CONFIG = "/etc/outbox/outbox.toml"
SHIPPED_RUNBOOK = "file:///opt/outbox/docs/operations.md"
CONFIG_MODE = 0o640  # root:outbox 0640: the daemon reads it, only root writes it
_SECTION = re.compile(r"\[([a-z_]+)\]\s*$")


class InstallError(OutboxError):
    """A file ``init``/``systemd`` would write exists, or an option cannot be used."""


def data_file(relative: str) -> Path:
    """A file shipped as package data (or at the checkout's root): ``docs/operations.md``."""
    return _find("_data", ".") / relative


# --------------------------------------------------------------------------- outbox init


def example_config(settings: Sequence[str] = ()) -> str:
    """``config.example.toml`` with each ``section.key=value`` of ``settings`` filled in."""
    text = data_file("config.example.toml").read_text("utf-8")
    defaults = tomllib.loads(text)
    for setting in settings:
        section, key, value = _parse_setting(setting, defaults)
        text = _replace_value(text, section, key, value)
    return text


def _parse_setting(setting: str, defaults: Mapping[str, Any]) -> tuple[str, str, str]:
    """``database.url=postgresql://…`` → (section, key, the value as TOML)."""
    name, sep, raw = setting.partition("=")
    section, _, key = name.strip().partition(".")
    if not sep or key not in defaults.get(section, {}):
        raise InstallError(
            f"--set {setting!r}: write SECTION.KEY=VALUE with a key of config.example.toml, "
            "e.g. --set database.url=postgresql://outbox_daemon@db/payments"
        )
    if isinstance(defaults[section][key], str):
        return section, key, json.dumps(raw)  # a JSON string is a TOML basic string
    try:
        tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        kind = type(defaults[section][key]).__name__
        raise InstallError(
            f"--set {name.strip()}={raw!r}: [{section}] {key} takes a {kind} written as in "
            f"TOML (e.g. {json.dumps(defaults[section][key])})"
        ) from None
    return section, key, raw


def _replace_value(text: str, section: str, key: str, value: str) -> str:
    lines, current = text.splitlines(keepends=True), None
    for number, line in enumerate(lines):
        if match := _SECTION.match(line):
            current = match.group(1)
        elif current == section and line.startswith(f"{key} = "):
            lines[number] = f"{key} = {value}\n"
    return "".join(lines)


def write_config(path: Path, settings: Sequence[str] = ()) -> None:
    """Write the commented config to ``path`` (mode 0640); never over an existing file.

    The text is checked as the daemon would load it first, so a bad ``--set`` writes nothing.
    """
    text = example_config(settings)
    with tempfile.TemporaryDirectory() as scratch:
        trial = Path(scratch) / path.name
        trial.write_text(text, "utf-8")
        try:  # a stand-in key: the key file named may not exist yet, init checks the rest
            load(trial, env={"RECRYPT_API_KEY": "stand-in"})
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(trial), str(path))) from None
    _create(path, text, CONFIG_MODE)


def _create(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise InstallError(
            f"{path} exists: outbox never overwrites it; edit it, or move it away first"
        ) from None
    except OSError as exc:
        raise InstallError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


# --------------------------------------------------------------------------- outbox systemd


def outbox_command() -> str:
    """This installation's ``outbox``: the script beside the running Python (the venv's)."""
    script = Path(sys.executable).parent / "outbox"
    return str(script) if script.is_file() else f"{sys.executable} -m outbox.cli"


def units(config_path: Path, command: str | None = None) -> dict[str, str]:
    """The shipped units, naming ``command``, the config file and the installed runbook."""
    replacements = {
        SHIPPED_EXECUTABLE: command or outbox_command(),
        SHIPPED_CONFIG: str(config_path.absolute()),
        SHIPPED_RUNBOOK: data_file("docs/operations.md").resolve().as_uri(),
    }
    rendered = {}
    for name in UNIT_NAMES:
        text = data_file(f"packaging/systemd/{name}").read_text("utf-8")
        for shipped, used in replacements.items():
            text = text.replace(shipped, used)
        rendered[name] = text
    return rendered


def write_units(directory: Path, rendered: Mapping[str, str], *, force: bool) -> list[Path]:
    """Write each unit into ``directory``; an existing one only with ``force``."""
    paths = [directory / name for name in rendered]
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise InstallError(
            f"{', '.join(existing)} exist: pass --force to replace them (site changes belong "
            "in a drop-in: systemctl edit outbox)"
        )
    for path in paths:
        path.write_text(rendered[path.name], "utf-8")
        path.chmod(0o644)
    return paths


def printed_units(rendered: Mapping[str, str]) -> str:
    """All units on one stream, each under a ``# ==> NAME <==`` line (as ``head`` does)."""
    return "\n".join(f"# ==> {name} <==\n{text}" for name, text in rendered.items())
