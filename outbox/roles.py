"""The shipped SQL that creates the database roles (``outbox db roles --print``).

The scripts live in ``outbox/sql/`` (package data) with ``@NAME@`` placeholders; this module
fills them in. Step 1 (``roles-*.sql``) creates the roles before ``outbox db upgrade``; step 2
(``grants-*.sql``) grants each one its rights on the tables the upgrade made. Nothing here
connects to a database: an administrator runs the printed SQL with ``psql`` or ``mariadb``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from outbox.errors import OutboxError

SQL_DIR = Path(__file__).resolve().parent / "sql"
#: ``outbox db roles --backend`` values: the script's suffix for each.
BACKENDS = {"postgresql": "postgresql", "mariadb": "mariadb", "mysql": "mariadb"}
#: What each role does (the README of the scripts says more); ``--prefix`` comes first.
ROLE_SUFFIXES = ("owner", "daemon", "writer", "reader", "operator")
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
NAME_LIMIT = 63  # PostgreSQL's identifier length; MariaDB allows 80 for a user name
_HOST = re.compile(r"[A-Za-z0-9_.%:-]+")
_PLACEHOLDER = re.compile(r"@([A-Z]+)@")


class RolesError(OutboxError):
    """An option of ``outbox db roles`` that would make broken or unsafe SQL."""


@dataclass(frozen=True)
class RoleNames:
    """The names filled into the scripts."""

    database: str
    prefix: str = "outbox"
    host: str = "%"  # MariaDB: the hosts each account may connect from

    def placeholders(self) -> dict[str, str]:
        names = {suffix.upper(): f"{self.prefix}_{suffix}" for suffix in ROLE_SUFFIXES}
        return names | {"DATABASE": self.database, "HOST": self.host}


def script(backend: str, names: RoleNames, *, grants: bool, source: str = "--backend") -> str:
    """The SQL of step 1 (roles) or step 2 (grants) for ``backend``, names filled in.

    ``source`` says where ``backend`` came from, for the error when it has no roles.
    """
    suffix = BACKENDS.get(backend)
    if suffix is None:
        raise RolesError(
            f"{source} names {backend!r}: roles exist only on PostgreSQL and MariaDB/MySQL; "
            f"pass --backend {' or '.join(BACKENDS)} (SQLite has no roles: protect its file)"
        )
    _check(names)
    template = (SQL_DIR / f"{'grants' if grants else 'roles'}-{suffix}.sql").read_text("utf-8")
    values = names.placeholders()
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def _check(names: RoleNames) -> None:
    """Names go into SQL as they are: only plain identifiers, so nothing needs quoting."""
    for option, value in (("--database", names.database), ("--prefix", names.prefix)):
        longest = f"{names.prefix}_operator" if option == "--prefix" else value
        if not _NAME.fullmatch(value) or len(longest) > NAME_LIMIT:
            raise RolesError(
                f"{option} {value!r}: write a plain name (a-z, 0-9, _; not starting with a "
                f"digit), at most {NAME_LIMIT} characters with the role suffix, e.g. outbox"
            )
    if not _HOST.fullmatch(names.host):
        raise RolesError(
            f"--host {names.host!r}: a MariaDB host pattern such as %, localhost or 10.0.0.%"
        )
