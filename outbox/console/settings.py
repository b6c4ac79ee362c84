"""The console's settings, resolved from ``[console]``: file paths, the session secret.

Relative defaults live beside the config file (or the working directory without one). The
session secret is read from its file, or made once and stored with mode 0600. Imports only the
config and the errors; never the API key (the console loads the config ``with_key=False``).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from outbox.config import Config
from outbox.errors import ConfigError

USERS_FILE = "console-users.json"
SECRET_FILE = "console-secret"  # noqa: S105 (a file name, not a secret)
SECRET_BYTES = 32
MIN_SECRET_CHARS = 32


@dataclass(frozen=True)
class ConsoleSettings:
    users_file: Path
    secret_file: Path
    host: str
    port: int
    proxy_header: str  # lower case; empty: off
    dual_control: bool
    redact_fields: tuple[str, ...]


def resolve(config: Config, config_path: str | None) -> ConsoleSettings:
    section, home = config.console, Path(config_path).parent if config_path else Path()
    host, _, port = section.listen.rpartition(":")
    return ConsoleSettings(
        users_file=Path(section.users_file) if section.users_file else home / USERS_FILE,
        secret_file=(
            Path(section.session_secret_file) if section.session_secret_file else home / SECRET_FILE
        ),
        host=host.strip("[]"),
        port=int(port),
        proxy_header=section.trusted_proxy_header.lower(),
        dual_control=section.dual_control,
        redact_fields=section.redact_fields,
    )


def session_secret(path: Path) -> str:
    """The secret in ``path``; made (and stored, mode 0600) when the file does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path)
    except OSError as exc:
        raise ConfigError(
            f"[console] session_secret_file: cannot create {path}: {exc.strerror}"
        ) from None
    secret = secrets.token_urlsafe(SECRET_BYTES)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(secret + "\n")
    return secret


def _read_secret(path: Path) -> str:
    try:
        secret = path.read_text("utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"[console] session_secret_file: cannot read {path}: {exc.strerror}"
        ) from None
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"[console] session_secret_file: {path} holds fewer than {MIN_SECRET_CHARS} "
            "characters; delete it and the console makes a new one"
        )
    if path.stat().st_mode & 0o077:
        raise ConfigError(
            f"[console] session_secret_file: {path} is readable by group or others; "
            f"run `chmod 600 {path}`"
        )
    return secret
