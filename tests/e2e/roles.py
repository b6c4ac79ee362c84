"""A database with the shipped roles (``outbox db roles --print``), made the runbook's way.

The scripts run through the servers' own clients (``psql``, ``mariadb``) as the admin of
``tests/conftest.py``'s server URL, as an administrator would run them. Roles are global to a
server, so each test gets its own prefix; the database and the roles are dropped after it.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass

from sqlalchemy.engine import make_url

from outbox import migrate
from outbox.database import make_engine, normalise_url
from outbox.roles import ROLE_SUFFIXES, RoleNames, script
from tests.conftest import SERVER_URLS, _create_database, _drop_database, require_server

ROLE_BACKENDS = ("postgresql", "mariadb")


@dataclass(frozen=True)
class RoledDatabase:
    """A database whose outbox tables belong to ``owner`` and are granted as shipped."""

    backend: str
    names: RoleNames

    def role(self, suffix: str) -> str:
        return f"{self.names.prefix}_{suffix}"

    def url(self, suffix: str) -> str:
        """The URL that logs in as the role ``{prefix}_{suffix}`` (with its password)."""
        server = normalise_url(SERVER_URLS[self.backend])
        url = server.set(
            username=self.role(suffix), password=password(suffix), database=self.names.database
        )
        return url.render_as_string(hide_password=False)


def password(suffix: str) -> str:
    return f"test-password-{suffix}"


def client_command(backend: str, database: str | None = None) -> tuple[list[str], dict[str, str]]:
    """``psql``/``mariadb`` logged in as the test server's admin, and its environment."""
    url = make_url(SERVER_URLS[backend])
    host, port, user = url.host or "127.0.0.1", str(url.port or ""), url.username or ""
    env = dict(os.environ)
    if backend == "postgresql":
        env["PGPASSWORD"] = url.password or ""  # type: ignore[assignment]
        command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", host, "-U", user]
        command += ["-p", port] if port else []
        return [*command, "-d", database or url.database or "postgres"], env
    env["MYSQL_PWD"] = str(url.password or "")
    command = ["mariadb", "-h", host, "-u", user, *(["-P", port] if port else [])]
    return [*command, *([database] if database else [])], env


def run_admin_sql(backend: str, sql: str, database: str | None = None) -> str:
    """Run ``sql`` with the server's client as its admin; fail the test with its stderr."""
    command, env = client_command(backend, database)
    done = subprocess.run(command, input=sql, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{command[0]} failed: {done.stderr}"
    return done.stdout


def set_passwords(db: RoledDatabase) -> str:
    """The runbook's step after the roles script: a password for each role (and unlock)."""
    if db.backend == "postgresql":
        lines = [f"ALTER ROLE {db.role(s)} PASSWORD '{password(s)}';" for s in ROLE_SUFFIXES]
    else:
        lines = [
            f"ALTER USER '{db.role(s)}'@'{db.names.host}' IDENTIFIED BY '{password(s)}' "
            "ACCOUNT UNLOCK;"
            for s in ROLE_SUFFIXES
        ]
    return "\n".join(lines) + "\n"


def drop_roles(backend: str, names: RoleNames) -> None:
    roles = [f"{names.prefix}_{suffix}" for suffix in ROLE_SUFFIXES]
    if backend == "postgresql":
        sql = "".join(f"DROP ROLE IF EXISTS {role};\n" for role in roles)
    else:
        sql = "".join(f"DROP USER IF EXISTS '{role}'@'{names.host}';\n" for role in roles)
    run_admin_sql(backend, sql)


def new_names() -> RoleNames:
    tag = uuid.uuid4().hex[:8]
    return RoleNames(database=f"outbox_test_{tag}", prefix=f"outbox_test_{tag}")


def make_roled_database(backend: str, cleanups: list[object]) -> RoledDatabase:
    """Roles (step 1), ``db upgrade`` as the owner, grants (step 2): the runbook's order.

    ``cleanups`` receives callables to run at teardown (drop the database, then the roles).
    """
    require_server(backend)
    names = new_names()
    _create_database(backend, names.database)
    cleanups.append(lambda: (_drop_database(backend, names.database), drop_roles(backend, names)))
    db = RoledDatabase(backend, names)
    run_admin_sql(backend, script(backend, names, grants=False), names.database)
    run_admin_sql(backend, set_passwords(db), names.database)
    owner = make_engine(db.url("owner"))
    try:
        migrate.upgrade(owner)
    finally:
        owner.dispose()
    run_admin_sql(backend, script(backend, names, grants=True), names.database)
    return db
