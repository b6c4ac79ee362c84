"""Lanes: one row of a lane in flight, whatever order writers commit in (issue 9, finding 1).

Every test here uses real concurrent transactions: two writers, or a writer and a claim, or
two claims, each on its own connection. A test that needs one transaction to be waiting on
another's lock finds out from the server itself (``pg_stat_activity``, InnoDB's
``INNODB_TRX``), never by sleeping. SQLite has one writer at a time (the database write lock
is taken at ``BEGIN IMMEDIATE``), so commits cannot overtake each other there; the tests of
what that makes possible run on PostgreSQL and MariaDB.
"""

from __future__ import annotations

import functools
import re
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection, Engine

import outbox
from outbox import migrate
from outbox.database import make_engine
from outbox.schema import messages, metadata
from outbox.simulator import TRANSFER
from outbox.store import Claim, Committed, HistoryLine, Store
from outbox.store.claims import due_query

LANE = "acme-trading"
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
LOCK_WAIT_TIMEOUT_S = 10.0
# InnoDB refreshes INFORMATION_SCHEMA.INNODB_TRX only when it was not read for 0.1 s: a
# faster poll reads the same stale snapshot for ever.
LOCK_POLL_S = 0.15
PAYLOAD = '{"fromAccount": "acme", "toAccount": "b", "amount": "1.00", "currency": "AUD"}'
INSERT = sa.text(
    "INSERT INTO outbox_messages (idempotency_key, method, payload, lane) "
    "VALUES (:key, :method, :payload, :lane)"
)


# --------------------------------------------------------------------------- helpers


def new_key() -> str:
    return str(uuid.uuid4())


def insert_plain(conn: Connection, lane: str | None = LANE) -> str:
    """A plain-SQL writer's INSERT (no lane lock), on the caller's transaction."""
    key = new_key()
    conn.execute(INSERT, {"key": key, "method": TRANSFER, "payload": PAYLOAD, "lane": lane})
    return key


def enqueue(conn: Connection, **options: Any) -> str:
    body = {"fromAccount": "acme", "toAccount": "b", "amount": "1.00", "currency": "AUD"}
    return outbox.enqueue(conn, TRANSFER, body, lane=LANE, **options)


def ids_by_key(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(messages.c.idempotency_key, messages.c.id)).all()
    return {key: id_ for key, id_ in rows}


def inflight_keys(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        query = sa.select(messages.c.idempotency_key).where(messages.c.state == "inflight")
        return list(conn.execute(query.order_by(messages.c.id)).scalars())


def commit_outcome(claim: Claim) -> Committed:
    return Committed(claim, HistoryLine("call", "committed", "OK", "ok"))


class Session:
    """One server connection whose server-side id is known, so its lock waits can be seen.

    ``conn`` is for a writer's own transaction; a ``Store`` on ``engine`` (one pooled
    connection) is a daemon on that same session.
    """

    def __init__(self, url: str) -> None:
        self.id = 0
        self.engine = make_engine(url, pool_size=1, max_overflow=0)
        sa.event.listen(self.engine, "connect", self._remember_id)
        with self.engine.connect():
            pass  # connect now: the id is known before anything waits

    def _remember_id(self, dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(BACKEND_ID[self.engine.dialect.name])
        self.id = int(cursor.fetchone()[0])
        cursor.close()
        dbapi_connection.rollback()

    @functools.cached_property
    def conn(self) -> Connection:
        return self.engine.connect()

    def close(self) -> None:
        if "conn" in self.__dict__:
            self.conn.close()
        self.engine.dispose()


BACKEND_ID = {
    "postgresql": "SELECT pg_backend_pid()",
    "mysql": "SELECT CONNECTION_ID()",
    "mariadb": "SELECT CONNECTION_ID()",
}


def waiting_on_a_lock(observer: Engine, session_id: int) -> bool:
    """Is that server session blocked on a row or transaction lock right now?"""
    if observer.dialect.name == "postgresql":
        sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = :id AND wait_event_type = 'Lock'"
    else:
        sql = (
            "SELECT count(*) FROM information_schema.INNODB_TRX "
            "WHERE trx_mysql_thread_id = :id AND trx_state = 'LOCK WAIT'"
        )
    with observer.connect() as conn:
        return bool(conn.execute(sa.text(sql), {"id": session_id}).scalar_one())


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a condition the server reports (a lock wait, a finished call)."""
    deadline = time.monotonic() + LOCK_WAIT_TIMEOUT_S
    tick = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        tick.wait(LOCK_POLL_S)


def blocked_or_done(observer: Engine, session: Session, future: Future[Any]) -> bool:
    """Wait until ``session`` waits on a lock or its work ended; True if it is waiting."""
    wait_until(
        lambda: future.done() or waiting_on_a_lock(observer, session.id),
        "the second transaction waits on a lock or finishes",
    )
    return not future.done()


@pytest.fixture(params=["postgresql", "mariadb"])
def server_url(request: pytest.FixtureRequest) -> str:
    """A fresh database on a server where two writers can commit out of order."""
    fixture = "postgres_url" if request.param == "postgresql" else "mariadb_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def observer(server_url: str) -> Iterator[Engine]:
    engine = make_engine(server_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(server_url: str) -> Iterator[Callable[[], Session]]:
    opened: list[Session] = []

    def open_session() -> Session:
        opened.append(Session(server_url))
        return opened[-1]

    yield open_session
    for session in opened:
        session.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


# --------------------------------------------------------------------------- the claim


def test_a_row_committed_late_waits_for_its_lanes_row_in_flight(
    server_url: str, observer: Engine, sessions: Callable[[], Session]
) -> None:
    """Writer 1 inserts A first and commits last; B (later id) is claimed in between.

    A must not be claimed while B is in flight, even though no earlier row of the lane is
    open; once B is recorded, A goes. (Seen on 371d9f8: A was claimed beside B.)
    """
    store = Store(observer)
    late, early = sessions(), sessions()
    with late.conn.begin():
        a = insert_plain(late.conn)
        with early.conn.begin():
            b = insert_plain(early.conn)
        assert ids_by_key(observer).keys() == {b}  # A is not visible yet
        (claim_b,) = store.claim_due("w1", 10, 30, NOW)
        assert claim_b.idempotency_key == b
    assert ids_by_key(observer)[a] < ids_by_key(observer)[b]

    assert store.claim_due("w2", 10, 30, NOW) == []
    assert inflight_keys(observer) == [b]

    assert store.record([commit_outcome(claim_b)], NOW) == []
    assert [c.idempotency_key for c in store.claim_due("w2", 10, 30, NOW)] == [a]


def test_a_row_in_flight_holds_back_only_its_lane(engine: Engine) -> None:
    store = Store(engine)
    with engine.begin() as conn:
        first, second = insert_plain(conn), insert_plain(conn)
        other, free = insert_plain(conn, lane="other-lane"), insert_plain(conn, lane=None)
    assert [c.idempotency_key for c in store.claim_due("w1", 1, 30, NOW)] == [first]
    claimed = [c.idempotency_key for c in store.claim_due("w2", 10, 30, NOW)]
    assert claimed == [other, free]
    assert second not in inflight_keys(engine)


def test_the_database_refuses_a_second_row_of_a_lane_in_flight(engine: Engine) -> None:
    """Whoever sets the state, two rows of one lane are never inflight at once."""
    with engine.begin() as conn:
        first, second = insert_plain(conn), insert_plain(conn)
        other = insert_plain(conn, lane="other-lane")
    inflight = sa.update(messages).values(state="inflight", lease_owner="x")
    with engine.begin() as conn:
        conn.execute(inflight.where(messages.c.idempotency_key == first))
        conn.execute(inflight.where(messages.c.idempotency_key == other))  # another lane
    with pytest.raises(sa.exc.IntegrityError, match="inflight_lane"), engine.begin() as conn:
        conn.execute(inflight.where(messages.c.idempotency_key == second))


def test_two_daemons_claiming_at_once_cannot_both_win_a_lane(
    server_url: str,
    observer: Engine,
    sessions: Callable[[], Session],
    pool: ThreadPoolExecutor,
) -> None:
    """Daemon 1 claims B and is about to commit; A commits; daemon 2 claims at that moment.

    Daemon 2 cannot see daemon 1's claim yet, so only the database can stop it: its claim of
    A waits on daemon 1's inflight row in the lane's unique index, loses with a unique
    violation when daemon 1 commits, and is run again (never surfaced): it then sees B in
    flight and claims nothing.
    """
    late, early = sessions(), sessions()
    late.conn.begin()
    a = insert_plain(late.conn)
    with early.conn.begin():
        b = insert_plain(early.conn)

    daemon1, daemon2 = sessions(), sessions()
    at_commit, go = threading.Event(), threading.Event()

    def hold_commit(_conn: Connection) -> None:
        at_commit.set()
        go.wait(LOCK_WAIT_TIMEOUT_S)

    sa.event.listen(daemon1.engine, "commit", hold_commit)
    first = pool.submit(Store(daemon1.engine).claim_due, "d1", 10, 30, NOW)
    assert at_commit.wait(LOCK_WAIT_TIMEOUT_S)
    late.conn.commit()

    second = pool.submit(Store(daemon2.engine).claim_due, "d2", 10, 30, NOW)
    waited = blocked_or_done(observer, daemon2, second)
    go.set()
    assert [c.idempotency_key for c in first.result()] == [b]
    assert [c.idempotency_key for c in second.result()] == []
    assert inflight_keys(observer) == [b]
    assert waited, "daemon 2's claim should have waited on daemon 1's row in the lane index"
    assert a in ids_by_key(observer)


# --------------------------------------------------------------------------- writers


def test_enqueue_serialises_a_lanes_writers(
    server_url: str,
    observer: Engine,
    sessions: Callable[[], Session],
    pool: ThreadPoolExecutor,
) -> None:
    """The second writer of a lane waits for the first to commit, so ids follow commits."""
    first, second = sessions(), sessions()
    with first.conn.begin():
        a = enqueue(first.conn)

        def second_writer() -> str:
            with second.conn.begin():
                return enqueue(second.conn)

        later = pool.submit(second_writer)
        assert blocked_or_done(observer, second, later), "the second writer did not wait"
    b = later.result(LOCK_WAIT_TIMEOUT_S)
    ids = ids_by_key(observer)
    assert ids[a] < ids[b]


def test_enqueue_can_leave_a_lane_unserialised(
    server_url: str, observer: Engine, sessions: Callable[[], Session]
) -> None:
    """``serialise_lane=False``: no lane lock (the caller orders its own writers)."""
    first, second = sessions(), sessions()
    with first.conn.begin():
        enqueue(first.conn, serialise_lane=False)
        with second.conn.begin():
            b = enqueue(second.conn, serialise_lane=False)  # would wait if locked
    assert b in ids_by_key(observer)


@pytest.mark.parametrize("lane_row_exists", [False, True], ids=["first-use", "known-lane"])
def test_three_writers_of_one_lane_queue_without_deadlock(
    lane_row_exists: bool,
    server_url: str,
    observer: Engine,
    sessions: Callable[[], Session],
    pool: ThreadPoolExecutor,
) -> None:
    """Two writers waiting behind a third both get the lock in turn; none is rolled back.

    (On MariaDB, ``INSERT IGNORE`` then ``SELECT … FOR UPDATE`` would deadlock here: both
    waiters hold a shared lock on the duplicate key and then ask for an exclusive one.)
    """
    if lane_row_exists:
        with observer.begin() as conn:
            enqueue(conn)
    holder, waiters = sessions(), [sessions(), sessions()]
    holder.conn.begin()
    a = enqueue(holder.conn)

    def write(session: Session) -> str:
        with session.conn.begin():
            return enqueue(session.conn)

    futures = []
    for session in waiters:
        futures.append(pool.submit(write, session))
        assert blocked_or_done(observer, session, futures[-1]), "a writer did not wait"
    holder.conn.commit()
    keys = [future.result(LOCK_WAIT_TIMEOUT_S) for future in futures]
    ids = ids_by_key(observer)
    assert all(ids[a] < ids[key] for key in keys)


def plain_sql_lane_lock(conn: Connection, lane: str) -> None:
    """The statements README § "Lanes and writers that commit out of order" gives."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text("INSERT INTO outbox_lanes (lane) VALUES (:lane) ON CONFLICT DO NOTHING"),
            {"lane": lane},
        )
        conn.execute(
            sa.text("SELECT lane FROM outbox_lanes WHERE lane = :lane FOR UPDATE"), {"lane": lane}
        )
    else:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_lanes (lane) VALUES (:lane) ON DUPLICATE KEY UPDATE lane = lane"
            ),
            {"lane": lane},
        )


def test_plain_sql_writers_take_the_same_lane_lock(
    server_url: str,
    observer: Engine,
    sessions: Callable[[], Session],
    pool: ThreadPoolExecutor,
) -> None:
    """A plain-SQL writer and ``outbox.enqueue`` wait for each other on the same lane row."""
    plain, python = sessions(), sessions()
    with plain.conn.begin():
        plain_sql_lane_lock(plain.conn, LANE)
        a = insert_plain(plain.conn)

        def python_writer() -> str:
            with python.conn.begin():
                return enqueue(python.conn)

        later = pool.submit(python_writer)
        assert blocked_or_done(observer, python, later), "enqueue did not wait for plain SQL"
    b = later.result(LOCK_WAIT_TIMEOUT_S)
    ids = ids_by_key(observer)
    assert ids[a] < ids[b]


def test_sqlite_writers_need_no_lane_row(sqlite_url: str) -> None:
    """SQLite serialises writers itself: ``enqueue`` with a lane takes no lane row there."""
    engine = make_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            enqueue(conn)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM outbox_lanes").scalar_one() == 0
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- the schema


def test_inflight_lane_is_a_generated_column_with_a_unique_index(engine: Engine) -> None:
    """Same column, expression and index on every backend; autogenerate sees no difference.

    Alembic only *warns* when a generated column's expression differs, so warnings are
    errors here.
    """
    inspector = sa.inspect(engine)
    column = next(
        c for c in inspector.get_columns("outbox_messages") if c["name"] == "inflight_lane"
    )
    assert "inflight" in str(column["computed"]["sqltext"]).lower()
    indexes = {i["name"]: i for i in inspector.get_indexes("outbox_messages")}
    assert indexes["uq_outbox_messages_inflight_lane"]["unique"]
    assert indexes["uq_outbox_messages_inflight_lane"]["column_names"] == ["inflight_lane"]
    with warnings.catch_warnings(), engine.connect() as conn:
        warnings.simplefilter("error")
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []


def test_the_lane_probes_are_index_lookups(server_url: str, observer: Engine) -> None:
    """The claim asks two questions of each lane row; each reads an index, never the table."""
    with observer.begin() as conn:
        conn.execute(sa.insert(messages), [lane_row(i) for i in range(20_500)])
        conn.exec_driver_sql("ANALYZE" if is_postgres(conn) else "ANALYZE TABLE outbox_messages")
    plan = claim_plan(observer)
    assert "uq_outbox_messages_inflight_lane" in plan["busy"], plan
    assert "ix_outbox_messages_lane_open" in plan["earlier"], plan


def lane_row(i: int) -> dict[str, Any]:
    """20,000 finished rows, one row in flight in each of 50 lanes, 450 pending behind them."""
    state = "committed" if i < 20_000 else "inflight" if i < 20_050 else "pending"
    lane = f"lane-{i % 50}"
    return {"idempotency_key": new_key(), "method": TRANSFER, "payload": {}, "lane": lane} | {
        "state": state,
        "lease_owner": "w" if state == "inflight" else None,
    }


def is_postgres(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def claim_plan(engine: Engine) -> dict[str, str]:
    """The claim's plan for each table alias (MariaDB: the index it reads)."""
    query = due_query(64, NOW, ()).with_only_columns(messages.c.id)
    sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        if not is_postgres(conn):
            rows = conn.exec_driver_sql(f"EXPLAIN {sql}").mappings().all()
            return {row["table"]: str(row["key"]) for row in rows}
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}"))
    assert "Seq Scan" not in plan, plan
    subplans = re.split(r"SubPlan \d+", plan)[1:]
    return {alias: sub for sub in subplans for alias in ("busy", "earlier") if f" {alias}" in sub}


def test_migration_0005_hands_back_a_second_row_of_a_lane_in_flight(
    backend: str, fresh_empty_url: Callable[[str], str]
) -> None:
    """Two daemons could put two rows of a lane in flight before 0005: the first one stays."""
    engine = make_engine(fresh_empty_url(backend))
    try:
        migrate.upgrade(engine, "0004")
        with engine.begin() as conn:
            keys = [insert_plain(conn) for _ in range(3)]
            conn.execute(sa.update(messages).values(state="inflight", lease_owner="w"))
        migrate.upgrade(engine)
        rows = {row.idempotency_key: row for row in Store(engine).list_rows().rows}
    finally:
        engine.dispose()
    assert [rows[k].state for k in keys] == ["inflight", "pending", "pending"]
    assert rows[keys[1]].maybe_executed and rows[keys[1]].lease_owner is None
    assert "migration 0005" in (rows[keys[1]].last_message or "")
