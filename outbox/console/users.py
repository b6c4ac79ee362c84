"""The console's users: a JSON file of names, roles and argon2id hashes (mode 0600).

``{"users": {"alice": {"role": "operator", "hash": "$argon2id$…"}}}``. The password itself is
never written. The file is re-read when it changes, so ``outbox console user remove`` takes
effect on the next request. Imports argon2 (the ``console`` extra) and the outbox's errors.
"""

from __future__ import annotations

import enum
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from outbox.errors import ConfigError

FILE_MODE = 0o600
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_HASHER = PasswordHasher()
#: Verified against when a name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _HASHER.hash("not a password of anyone")


class Role(enum.StrEnum):
    VIEWER = "viewer"  # reads every page
    OPERATOR = "operator"  # may also requeue and cancel


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    hash: str = ""  # empty: a user known only through the trusted proxy header

    @property
    def may_act(self) -> bool:
        return self.role == Role.OPERATOR


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ConfigError(
            f"user name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


def read_users(path: Path) -> dict[str, User]:
    """The users in ``path``; a missing file holds none."""
    try:
        document = json.loads(path.read_text("utf-8"))
        entries = document["users"]
        return {
            name: User(name, Role(entry["role"]), entry.get("hash", ""))
            for name, entry in entries.items()
        }
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"[console] users_file {path} is not a users file ({type(exc).__name__}: {exc}); "
            "recreate it with `outbox console user add`"
        ) from None


def write_users(path: Path, users: dict[str, User]) -> None:
    """Replace ``path`` atomically with ``users``, mode 0600 from the start."""
    document = {"users": {u.name: {"role": u.role.value, "hash": u.hash} for u in users.values()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=".users-", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2, sort_keys=True)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify(user: User | None, password: str) -> bool:
    """True when ``password`` is ``user``'s; as slow for an unknown user as for a known one."""
    try:
        return _HASHER.verify(user.hash if user and user.hash else _DUMMY_HASH, password) and (
            user is not None and bool(user.hash)
        )
    except (VerificationError, InvalidHashError):
        return False


class UserFile:
    """``read_users`` again whenever the file's modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._users: dict[str, User] = {}

    def get(self, name: str) -> User | None:
        try:
            info = self.path.stat()
            stamp: tuple[int, int] | None = (info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._seen:
            self._users, self._seen = read_users(self.path), stamp
        return self._users.get(name)
