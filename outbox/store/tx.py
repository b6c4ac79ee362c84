"""Transactions: one per operation, run again when it lost a lock race; errors sorted by cause.

``write`` runs an operation in a transaction and retries it on a deadlock, a serialisation
failure or a lane race (``transient``); ``read`` hands it a connection that is rolled back.
``connection_level`` and ``error_name`` tell the recording path whether an error refused a
row's data or lost the connection. ``lock_lane`` keeps a lane's ids in commit order.

Imports SQLAlchemy, tenacity and ``outbox.schema`` only: never gRPC, the dispatcher, the daemon
or the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
import tenacity
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from outbox.schema import lanes

P = ParamSpec("P")
T = TypeVar("T")

# MySQL/MariaDB: 1213 deadlock, 1205 lock wait timeout; PostgreSQL: 40P01 deadlock, 40001
# serialization failure; SQLite: "database is locked" past the busy timeout.
_TRANSIENT_CODES = {1213, 1205, "40P01", "40001"}

#: The index that keeps one row of a lane in flight (migration 0005), as every database names
#: it in a unique violation: PostgreSQL and MariaDB give the index, SQLite the column.
_LANE_RACE = "inflight_lane"

#: MariaDB/MySQL server errors that pymysql raises as OperationalError although they refuse a
#: row's data, not the connection: a CHECK constraint failed (3819 MySQL, 4025 MariaDB).
_REFUSED_DATA_CODES = {3819, 4025}


def transient(exc: BaseException) -> bool:
    """A transaction that lost a lock race: rolled back whole, safe to run again.

    That includes a claim that lost a lane to another daemon's concurrent claim: neither saw
    the other's uncommitted row, the lane's unique index refused the second; run again, the
    claim sees the winner's row in flight and leaves the lane alone.
    """
    if isinstance(exc, sa.exc.IntegrityError):
        return _LANE_RACE in str(exc.orig)
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    orig = exc.orig
    args = getattr(orig, "args", None) or (None,)
    code = getattr(orig, "sqlstate", None) or args[0]
    return code in _TRANSIENT_CODES or "database is locked" in str(orig)


#: Every public store operation is one transaction; one that lost a deadlock is run again.
retry_transient = tenacity.retry(
    retry=tenacity.retry_if_exception(transient),
    stop=tenacity.stop_after_attempt(5),
    wait=tenacity.wait_random_exponential(multiplier=0.01, max=0.5),
    reraise=True,
)


def write(
    engine: Engine,
    operation: Callable[Concatenate[Connection, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``operation`` in one transaction of its own, run again if it lost a lock race."""
    return _in_transaction(engine, lambda conn: operation(conn, *args, **kwargs))


@retry_transient
def _in_transaction(engine: Engine, run: Callable[[Connection], T]) -> T:
    with engine.begin() as conn:
        return run(conn)


def read(
    engine: Engine,
    operation: Callable[Concatenate[Connection, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``operation`` on a connection of its own, rolled back when it is returned to the pool."""
    with engine.connect() as conn:
        return operation(conn, *args, **kwargs)


def connection_level(exc: sa.exc.StatementError) -> bool:
    """Not the row's fault: no connection, a dropped one, a server that stopped answering."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return False  # a value that could not even be bound: the row's data
    if exc.connection_invalidated or isinstance(exc, sa.exc.InterfaceError):
        return True
    code = (getattr(exc.orig, "args", None) or (None,))[0]
    return isinstance(exc, sa.exc.OperationalError) and code not in _REFUSED_DATA_CODES


def error_name(exc: sa.exc.StatementError) -> str:
    """The error's class and code, never its text (which may quote the refused value)."""
    orig = exc.orig if exc.orig is not None else exc
    code = getattr(orig, "sqlstate", None) or (getattr(orig, "args", None) or (None,))[0]
    return type(orig).__name__ + (f" {code}" if isinstance(code, (int, str)) else "")


def dialect_of(conn: Connection | Session) -> str:
    return conn.get_bind().dialect.name if isinstance(conn, Session) else conn.dialect.name


def lock_lane(conn: Connection | Session, lane: str | None) -> None:
    """Hold ``lane``'s writer lock until the caller's transaction ends; ids then follow commits.

    Two writers of one lane that commit out of order give the later commit the smaller id,
    and the daemon may already have sent the larger one. A writer holding the lane's row in
    ``outbox_lanes`` from before its INSERT until its COMMIT makes the next writer of the
    lane wait, so its row gets a larger id and is sent after. SQLite needs nothing: it has
    one writer at a time. MariaDB takes the row with ``ON DUPLICATE KEY UPDATE``, which locks
    it exclusively at once: ``INSERT IGNORE`` would leave two waiting writers each holding a
    shared lock, and their ``FOR UPDATE`` would then deadlock.
    """
    name = dialect_of(conn)
    if lane is None or name == "sqlite":
        return
    if name == "postgresql":
        conn.execute(postgresql.insert(lanes).values(lane=lane).on_conflict_do_nothing())
    else:
        upsert = mysql.insert(lanes).values(lane=lane)
        conn.execute(upsert.on_duplicate_key_update(lane=upsert.inserted.lane))
    conn.execute(sa.select(lanes.c.lane).where(lanes.c.lane == lane).with_for_update())
