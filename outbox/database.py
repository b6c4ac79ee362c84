"""Engines for the three supported databases, each set up the way the outbox relies on.

- SQLite: WAL, a busy timeout, and ``BEGIN IMMEDIATE`` so a claim takes the write lock up
  front instead of failing halfway with "database is locked" (one daemon per file).
- MariaDB/MySQL: session time zone UTC, READ COMMITTED (SKIP LOCKED claims).
- PostgreSQL: READ COMMITTED (the default), psycopg 3, and ``enable_seqscan`` off: every
  query of the outbox is written for an index, and a planner misled by one huge lane or
  fresh statistics must not choose to read the table instead (issue #11: a correlated lane
  probe that scanned the table ran for minutes beside another scan). Sequential scans stay
  possible where no index can serve; they are only priced out.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from outbox.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 10_000
#: The driver each backend uses, whatever the URL names: another app's URL often names
#: psycopg2 or mysqlclient; they take the same URL, so the outbox's own driver is used instead.
_OUR_DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql"}
_SAME_URL_DRIVERS = {
    "postgresql": ("", "psycopg", "psycopg2", "psycopg2cffi"),
    "mysql": ("", "pymysql", "mysqldb", "mysqlconnector", "mariadbconnector"),
    "mariadb": ("", "pymysql", "mysqldb", "mysqlconnector", "mariadbconnector"),
    "sqlite": ("", "pysqlite"),
}
_BACKEND_ALIASES = {"postgres": "postgresql"}  # Heroku's and many apps' spelling
_EXAMPLES = "e.g. sqlite:///outbox.db, postgresql://user@host/dbname or mysql://user@host/dbname"


def normalise_url(url: str | URL) -> URL:
    """Accept the common spellings of the supported databases and use our chosen drivers.

    Every URL the outbox cannot use is a ``ConfigError`` of one line naming ``[database] url``
    and what to write instead.
    """
    parsed = _parse(url)
    backend = _BACKEND_ALIASES.get(parsed.get_backend_name(), parsed.get_backend_name())
    driver = parsed.get_driver_name() if "+" in parsed.drivername else ""
    if backend not in _SAME_URL_DRIVERS:
        raise ConfigError(
            f"[database] url: {backend} is not supported; use sqlite, postgresql or "
            f"mysql/mariadb ({_EXAMPLES})"
        )
    if driver not in _SAME_URL_DRIVERS[backend]:
        raise ConfigError(
            f"[database] url: the driver {driver} is not one the outbox uses; write "
            f"{backend}://… without a driver (the outbox brings its own)"
        )
    ours = _OUR_DRIVERS.get(backend)
    return parsed.set(drivername=f"{backend}+{ours}" if ours else parsed.drivername)


def _parse(url: str | URL) -> URL:
    if not isinstance(url, str):
        return url
    if "://" not in url:
        raise ConfigError(
            f"[database] url has no scheme (it needs one such as sqlite:// or postgresql://); "
            f"{_EXAMPLES}"
        )
    try:
        return make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        raise ConfigError(f"[database] url is not a database URL; {_EXAMPLES}") from None


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    # Errors never quote statement parameters: they can hold payloads and responses.
    kwargs.setdefault("hide_parameters", True)
    parsed = normalise_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed, **kwargs)
    if backend in ("mysql", "mariadb"):
        engine = sa.create_engine(
            parsed, isolation_level="READ COMMITTED", pool_pre_ping=True, **kwargs
        )
        sa.event.listen(engine, "connect", _mysql_utc)
        return engine
    engine = sa.create_engine(parsed, pool_pre_ping=True, **kwargs)
    sa.event.listen(engine, "connect", _postgres_indexes_only)
    return engine


def _postgres_indexes_only(dbapi_connection: Any, _record: Any) -> None:
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
    dbapi_connection.commit()


def _mysql_utc(dbapi_connection: Any, _record: Any) -> None:
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET time_zone = '+00:00'")


def _sqlite_engine(url: URL, **kwargs: Any) -> Engine:
    engine = sa.create_engine(url, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        if url.database and url.database != ":memory:":
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
