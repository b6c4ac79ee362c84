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
_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}


def normalise_url(url: str | URL) -> URL:
    """Accept plain ``postgresql://`` and ``mysql://`` URLs and pick our chosen drivers."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except sa.exc.ArgumentError:
        raise ConfigError(
            "[database] url is not a database URL; e.g. sqlite:///outbox.db or "
            "postgresql://user@host/dbname"
        ) from None
    if parsed.drivername in _DRIVERS:
        parsed = parsed.set(drivername=_DRIVERS[parsed.drivername])
    if parsed.get_backend_name() not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise ConfigError(
            f"[database] url: {parsed.get_backend_name()} is not supported; "
            "use sqlite, postgresql or mysql/mariadb"
        )
    return parsed


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
