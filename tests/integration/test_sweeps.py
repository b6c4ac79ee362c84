"""The reaper and the expirer sweep a batch in a fixed number of statements (issue 13), and
a row that changed under a sweep keeps its change: the guard still holds for each row.

Between a sweep's locking SELECT and its UPDATE nothing else can take a row (it is locked, or
SQLite's write lock is held), so a change "in between" is made here on the sweep's own
connection, just before its UPDATE: the sweep must leave that row alone, give it no history
line and not count it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from outbox.schema import attempts, messages
from outbox.store import NewRow, Store, enqueue_row, new_key

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
METHOD = "/recrypt.wallet.v1.Wallet/Transfer"
PAYLOAD = {"fromAccount": "a", "toAccount": "b", "amount": "1.00"}


def _fill(engine: Engine, n: int, *, expires_at: datetime | None = None) -> None:
    with engine.begin() as conn:
        for _ in range(n):
            enqueue_row(conn, NewRow(new_key(), METHOD, PAYLOAD, expires_at=expires_at), NOW)


def _make_unknown(engine: Engine, ids: list[int], unknown_attempts: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.update(messages)
            .where(messages.c.id.in_(ids))
            .values(unknown_attempts=unknown_attempts, maybe_executed=True)
        )


@contextmanager
def _statements(engine: Engine) -> Iterator[list[str]]:
    """Every statement on the outbox's tables sent meanwhile (one per executemany)."""
    seen: list[str] = []

    def listen(_c: Any, _cur: Any, statement: str, *_rest: Any) -> None:
        if "outbox_" in statement:
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", listen)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", listen)


@contextmanager
def _before_first_update(engine: Engine, sql: str) -> Iterator[None]:
    """Run ``sql`` on the sweep's own connection just before its first UPDATE of a row."""
    done: list[bool] = []

    def listen(_c: Any, cursor: Any, statement: str, *_rest: Any) -> None:
        if not done and statement.lstrip().upper().startswith("UPDATE OUTBOX_MESSAGES"):
            done.append(True)
            other = cursor.connection.cursor()
            other.execute(sql)
            other.close()

    sa.event.listen(engine, "before_cursor_execute", listen)
    try:
        yield
    finally:
        sa.event.remove(engine, "before_cursor_execute", listen)


def _history(engine: Engine, actor: str) -> list[int]:
    with engine.connect() as conn:
        found = conn.execute(sa.select(attempts.c.message_id).where(attempts.c.actor == actor))
        return sorted(found.scalars())


def _reap(engine: Engine, n: int) -> tuple[int, list[str]]:
    """``n`` rows in flight past their lease, a third of them at their last unknown attempt:
    the statements of one reaper sweep, and the keys it resent."""
    _fill(engine, n)
    store = Store(engine)
    claims = store.claim_due("w1", n, 30.0, NOW)
    _make_unknown(engine, [c.id for c in claims[: n // 3]], 9)
    with _statements(engine) as seen:
        resent = store.release_expired_leases(LATER, max_unknown_attempts=10)
    assert len(resent) == n - n // 3
    assert _history(engine, "reaper") == sorted(c.id for c in claims)
    return len(seen), resent


def test_the_reaper_sweeps_a_batch_in_a_fixed_number_of_statements(engine: Engine) -> None:
    few, _ = _reap(engine, 3)
    with engine.begin() as conn:
        conn.execute(attempts.delete())
        conn.execute(messages.delete())
    many, _ = _reap(engine, 30)
    assert few == many <= 4, "one SELECT, one UPDATE per kind, one INSERT of history lines"


def test_the_reaper_leaves_a_row_another_worker_took(engine: Engine) -> None:
    _fill(engine, 6)
    store = Store(engine)
    claims = store.claim_due("w1", 6, 30.0, NOW)
    taken = claims[2]
    sql = f"UPDATE outbox_messages SET lease_owner = 'w2' WHERE id = {taken.id}"
    with _before_first_update(engine, sql):
        resent = store.release_expired_leases(LATER)
    assert taken.idempotency_key not in resent and len(resent) == 5
    assert store.get(taken.idempotency_key).state == "inflight"
    assert store.get(taken.idempotency_key).lease_owner == "w2"
    assert _history(engine, "reaper") == sorted(c.id for c in claims if c.id != taken.id)


def test_the_expirer_sweeps_a_batch_in_a_fixed_number_of_statements(engine: Engine) -> None:
    counts = []
    for n in (3, 30):
        with engine.begin() as conn:
            conn.execute(attempts.delete())
            conn.execute(messages.delete())
        _fill(engine, n, expires_at=NOW + timedelta(minutes=1))
        with engine.connect() as conn:
            ids = sorted(conn.execute(sa.select(messages.c.id)).scalars())
        _make_unknown(engine, ids[: n // 3], 1)
        with _statements(engine) as seen:
            assert Store(engine).expire_due(LATER) == (n - n // 3, n // 3)
        assert _history(engine, "expirer") == ids
        counts.append(len(seen))
    assert counts[0] == counts[1], counts


def test_the_expirer_leaves_a_row_another_worker_took(engine: Engine) -> None:
    _fill(engine, 4, expires_at=NOW + timedelta(minutes=1))
    store = Store(engine)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(messages.c.id, messages.c.idempotency_key)).all()
    taken = rows[1]
    sql = f"UPDATE outbox_messages SET state = 'inflight', lease_owner = 'w2' WHERE id = {taken.id}"
    with _before_first_update(engine, sql):
        assert store.expire_due(LATER) == (3, 0)
    assert store.get(taken.idempotency_key).state == "inflight"
    assert _history(engine, "expirer") == sorted(r.id for r in rows if r.id != taken.id)
