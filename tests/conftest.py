"""Shared fixtures: a fresh database per test, on SQLite, PostgreSQL and MariaDB.

- ``db_url`` (parametrised by ``backend``: ids ``sqlite``, ``postgresql``, ``mariadb``, so
  ``-k postgresql`` selects) yields the URL of a new database at schema head with no rows.
- ``sqlite_url`` / ``postgres_url`` / ``mariadb_url``: the same on one named backend.
- ``engine``: ``outbox.database.make_engine(db_url)``, disposed after the test.
- ``fresh_empty_url(backend)``: a new database with no schema at all (dropped after the test).

Making them is cheap: PostgreSQL copies a template migrated once per session
(``CREATE DATABASE … TEMPLATE``), SQLite copies a migrated file, MariaDB runs the migration.

Servers: ``OUTBOX_TEST_POSTGRES_URL`` and ``OUTBOX_TEST_MARIADB_URL`` (admin URLs). One that
does not answer fails its tests when ``CI`` is true and skips them otherwise.
"""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from outbox import migrate
from outbox.database import make_engine, normalise_url

BACKENDS = ("sqlite", "postgresql", "mariadb")
SERVER_URLS = {
    "postgresql": os.environ.get(
        "OUTBOX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    ),
    "mariadb": os.environ.get("OUTBOX_TEST_MARIADB_URL", "mysql://root@127.0.0.1:3306/"),
}
START_HINTS = {
    "postgresql": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "mariadb": "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd",
}
ENV_NAMES = {"postgresql": "OUTBOX_TEST_POSTGRES_URL", "mariadb": "OUTBOX_TEST_MARIADB_URL"}
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
CONNECT_TIMEOUT_S = 3


# --- servers -------------------------------------------------------------------------------


@functools.cache
def _admin_engine(backend: str) -> Engine:
    """An AUTOCOMMIT engine on the server's admin URL (CREATE/DROP DATABASE)."""
    return sa.create_engine(
        normalise_url(SERVER_URLS[backend]),
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
        poolclass=sa.NullPool,
    )


@functools.cache
def _unreachable_reason(backend: str) -> str | None:
    """None if the server answers, else why not. Asked once per session."""
    try:
        with _admin_engine(backend).connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except sa.exc.DBAPIError as exc:
        return str(exc.orig).strip().splitlines()[0]
    return None


def require_server(backend: str) -> None:
    """Fail (in CI) or skip (elsewhere) when ``backend``'s server does not answer."""
    if backend == "sqlite" or (reason := _unreachable_reason(backend)) is None:
        return
    shown = normalise_url(SERVER_URLS[backend]).render_as_string(hide_password=True)
    message = (
        f"{backend} at {shown} does not answer ({reason}). "
        f"Start it ({START_HINTS[backend]}) or point {ENV_NAMES[backend]} at a server."
    )
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _database_url(backend: str, name: str) -> str:
    url = normalise_url(SERVER_URLS[backend]).set(database=name)
    return url.render_as_string(hide_password=False)


def _create_database(backend: str, name: str, template: str | None = None) -> str:
    sql = f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else "")
    with _admin_engine(backend).connect() as connection:
        connection.exec_driver_sql(sql)
    return _database_url(backend, name)


def _drop_database(backend: str, name: str) -> None:
    # PostgreSQL: FORCE ends sessions a test left open (PG 13+); MariaDB has no such need.
    force = " WITH (FORCE)" if backend == "postgresql" else ""
    with _admin_engine(backend).connect() as connection:
        connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")


def _new_name() -> str:
    return f"outbox_test_{uuid.uuid4().hex[:8]}"


def _migrate(url: str) -> None:
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()


# --- session templates ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def _postgres_template() -> Iterator[str]:
    """A database at head, migrated once per session; each test copies it."""
    require_server("postgresql")
    name = f"outbox_template_{uuid.uuid4().hex[:8]}"  # per session: parallel runs don't clash
    _migrate(_create_database("postgresql", name))
    yield name
    _drop_database("postgresql", name)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file (checkpointed: the engine is disposed) to copy per test."""
    path = tmp_path_factory.mktemp("sqlite_template") / "outbox.db"
    _migrate(f"sqlite:///{path}")
    return path


# --- per-test databases --------------------------------------------------------------------


def _fresh_at_head(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new database at schema head, dropped when the test ends."""
    require_server(backend)
    if backend == "sqlite":
        path = tmp_path / f"{_new_name()}.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        return f"sqlite:///{path}"
    name = _new_name()
    request.addfinalizer(functools.partial(_drop_database, backend, name))
    if backend == "postgresql":
        return _create_database(
            backend, name, template=request.getfixturevalue("_postgres_template")
        )
    url = _create_database(backend, name)
    _migrate(url)  # MariaDB has no templates; create + migrate + drop is ~0.15 s
    return url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _fresh_at_head(backend, request, tmp_path)


@pytest.fixture
def sqlite_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _fresh_at_head("sqlite", request, tmp_path)


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _fresh_at_head("postgresql", request, tmp_path)


@pytest.fixture
def mariadb_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _fresh_at_head("mariadb", request, tmp_path)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def fresh_empty_url(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``fresh_empty_url(backend)``: the URL of a new database with no tables at all."""
    with ExitStack() as cleanup:

        def make(backend: str) -> str:
            require_server(backend)
            name = _new_name()
            if backend == "sqlite":
                return f"sqlite:///{tmp_path / name}.db"
            cleanup.callback(_drop_database, backend, name)
            return _create_database(backend, name)

        yield make
