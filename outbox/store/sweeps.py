"""Sweeps (the background services'): the reaper's expired leases, the expirer's rows past
``expires_at``, and retention's purges of finished rows and, much later, of their tombstones.

Each sweep takes one bounded batch: a locking SELECT (``SKIP LOCKED``: rows another
transaction holds are left for the next sweep), then one statement per kind of transition for
the whole batch, each still guarded by the state it expects, and one INSERT of the batch's
history lines. The lock means the guard always holds in practice; if a row did change under
it, ``_changed`` reads which rows the transition moved, and only those get a history line.

Imports SQLAlchemy, ``outbox.schema``, ``outbox.payload``, ``outbox.clock`` and the store's
own modules only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from outbox.clock import utcnow
from outbox.payload import bounded, read_text
from outbox.schema import FINISHED_STATES, State, attempts, messages, tombstones
from outbox.store import heads as lane_heads
from outbox.store.columns import PENDING, as_written
from outbox.store.history import add_lines, history_params
from outbox.store.rows import HistoryLine
from outbox.vocabulary import HistoryDecision, HistoryKind

m = messages
LEASE_EXPIRED = "LEASE_EXPIRED"


# ---- the reaper


def _release_statement(**values: Any) -> sa.Update:
    """An expired lease, guarded by the owner seen: the call may have executed, so it counts
    an attempt whose outcome is unknown."""
    return (
        m.update()
        .where(
            m.c.id == sa.bindparam("r_id"),
            m.c.state == State.INFLIGHT,
            m.c.lease_owner == sa.bindparam("r_owner"),
        )
        .values(
            **values,
            attempts=m.c.attempts + 1,
            unknown_attempts=m.c.unknown_attempts + 1,
            maybe_executed=True,
            lease_owner=None,
            lease_expires_at=None,
            next_attempt_at=None,
            last_code=LEASE_EXPIRED,
            last_message=sa.bindparam("r_message", type_=sa.Text()),
            updated_at=sa.bindparam("r_now", type_=m.c.updated_at.type),
        )
    )


_RESEND = _release_statement(state=State.PENDING)
_PARK_UNKNOWN = _release_statement(state=State.PARKED, park_reason="unknown_outcome")


def release_expired_leases(
    conn: Connection, now: datetime, limit: int = 500, *, max_unknown_attempts: int = 10
) -> list[str]:
    """The reaper: inflight rows whose lease ran out go back to pending, maybe executed.

    The worker died or hung mid-call, so the call may have executed: the row is resent
    with the same key (safe) and counts an attempt whose outcome is unknown. A release that
    would reach ``max_unknown_attempts`` ([retry] max_unknown_attempts; 10 is its default)
    parks the row ``unknown_outcome`` instead: a call that hangs every time is not resent
    for ever. Returns the keys released to pending (the parked ones are not).
    """
    rows = conn.execute(
        sa.select(
            m.c.id,
            as_written(m.c.idempotency_key).label("key"),
            m.c.lease_owner,
            m.c.attempts,
            m.c.unknown_attempts,
        )
        .where(m.c.state == State.INFLIGHT, m.c.lease_expires_at < now)
        .order_by(m.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    parks = [row for row in rows if row.unknown_attempts + 1 >= max_unknown_attempts]
    resends = [row for row in rows if row.unknown_attempts + 1 < max_unknown_attempts]
    lines = _release(conn, parks, now, parks=True) + _release(conn, resends, now, parks=False)
    add_lines(conn, lines)
    moved = {line["message_id"] for line in lines}
    return [read_text(row.key, "idempotency_key")[0] for row in resends if row.id in moved]


def _release(
    conn: Connection, rows: Sequence[Any], now: datetime, *, parks: bool
) -> list[dict[str, Any]]:
    """Expired leases: back to pending, or parked ``unknown_outcome``, in one statement; the
    history lines of the rows it moved."""
    if not rows:
        return []
    calls = [_release_line(row, parks=parks) for row in rows]
    params = [
        {"r_id": row.id, "r_owner": row.lease_owner, "r_message": bounded(text), "r_now": now}
        for row, (text, _line) in zip(rows, calls, strict=True)
    ]
    done = conn.execute(_PARK_UNKNOWN if parks else _RESEND, params)
    moved = _changed(conn, rows, done.rowcount, _released_by_us)
    return [
        history_params(row.id, now, "reaper", line)
        for row, (_text, line) in zip(rows, calls, strict=True)
        if row.id in moved
    ]


def _release_line(row: Any, *, parks: bool) -> tuple[str, HistoryLine]:
    """The row's last message and its history line."""
    owner, unknown = row.lease_owner, row.unknown_attempts + 1
    if parks:
        text = (
            f"lease of worker {owner} expired mid-call; outcome unknown for {unknown} attempts: "
            "check on recrypt.net whether the transaction with this idempotency key happened, "
            "then requeue (same key, safe) or cancel --force"
        )
        return text, HistoryLine(HistoryKind.SYSTEM, HistoryDecision.PARK, LEASE_EXPIRED, text)
    text = f"lease of worker {owner} expired mid-call: resending with the same key (safe)"
    line = HistoryLine(
        HistoryKind.SYSTEM, HistoryDecision.LEASE_EXPIRED, LEASE_EXPIRED, f"worker {owner}"
    )
    return text, line


def _released_by_us(before: Any, after: Any) -> bool:
    """Released by this sweep: no owner now, and the attempt it counted."""
    return bool(
        after.lease_owner is None
        and after.last_code == LEASE_EXPIRED
        and after.attempts == before.attempts + 1
    )


# ---- the expirer

_EXPIRED = {
    "state": State.EXPIRED,
    "lane_behind": False,
    "last_message": "expired: not sent before expires_at (never executed)",
}
_EXPIRED_UNKNOWN = {
    "state": State.PARKED,
    "park_reason": "expired_unknown",
    "last_message": "expired with unknown outcome: an earlier attempt may have executed; "
    "check on recrypt.net, then cancel --force or requeue",
}


def expire_due(conn: Connection, now: datetime, limit: int = 500) -> tuple[int, int]:
    """Pending rows past ``expires_at``: expired, or parked if an attempt may have executed.

    Returns (expired, parked).
    """
    rows = conn.execute(
        sa.select(m.c.id, m.c.maybe_executed)
        .where(m.c.state == PENDING, m.c.expires_at <= now)
        .order_by(m.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    unknown = [row for row in rows if row.maybe_executed]
    never = [row for row in rows if not row.maybe_executed]
    parked = _expire(conn, unknown, now, _EXPIRED_UNKNOWN)
    expired = _expire(conn, never, now, _EXPIRED)
    lines = [
        history_params(row.id, now, "expirer", _expiry_line(row.id in parked))
        for row in rows
        if row.id in parked or row.id in expired
    ]
    add_lines(conn, lines)
    lane_heads.settle(conn, [row.id for row in never])
    return len(expired), len(parked)


def _expire(
    conn: Connection, rows: Sequence[Any], now: datetime, values: dict[str, Any]
) -> set[int]:
    """One UPDATE for the rows, guarded by the state they were seen in; the ids it moved."""
    if not rows:
        return set()
    done = conn.execute(
        m.update()
        .where(m.c.id.in_([row.id for row in rows]), m.c.state == State.PENDING)
        .values(**values, updated_at=now, next_attempt_at=None)
    )
    return _changed(
        conn, rows, done.rowcount, lambda _before, after: after.state == values["state"]
    )


def _expiry_line(parks: bool) -> HistoryLine:
    return HistoryLine(
        HistoryKind.SYSTEM, HistoryDecision.PARK if parks else HistoryDecision.EXPIRED
    )


def _changed(
    conn: Connection, rows: Sequence[Any], count: int, moved: Callable[[Any, Any], bool]
) -> set[int]:
    """The ids of ``rows`` a guarded statement moved: all of them when it counted as many
    (the locking SELECT makes that the rule), else those whose state now says so."""
    if count == len(rows):
        return {row.id for row in rows}
    found = conn.execute(
        sa.select(m.c.id, m.c.state, m.c.lease_owner, m.c.attempts, m.c.last_code).where(
            m.c.id.in_([row.id for row in rows])
        )
    )
    after = {row.id: row for row in found}
    return {row.id for row in rows if row.id in after and moved(row, after[row.id])}


# ---- retention


def purge_finished(
    conn: Connection, older_than: datetime, batch: int, *, now: datetime | None = None
) -> int:
    """Delete one batch of finished rows (and their history) last updated before a time.

    Each purged key leaves a tombstone in the same transaction: Recrypt may remember the
    key long after the row is gone, and a new request under it would "commit" on
    ALREADY_EXISTS without its effect. ``purge_tombstones`` removes them much later.
    """
    rows = conn.execute(
        sa.select(
            m.c.id,
            as_written(m.c.idempotency_key).label("key"),
            m.c.payload_fingerprint,
            m.c.state,
            m.c.updated_at,
        )
        .where(m.c.state.in_([s.value for s in FINISHED_STATES]), m.c.updated_at < older_than)
        .order_by(m.c.id)
        .limit(batch)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return 0
    _bury(conn, rows, now or utcnow())
    ids = [row.id for row in rows]
    conn.execute(attempts.delete().where(attempts.c.message_id.in_(ids)))
    conn.execute(m.delete().where(m.c.id.in_(ids)))
    return len(ids)


def _bury(conn: Connection, rows: Sequence[Any], now: datetime) -> None:
    """Tombstones for the keys of rows about to be purged.

    A key that already has one keeps it: the first use is the one Recrypt knows (the later row
    was a reuse, parked ``key_reused`` and cancelled). Keys are compared case-folded, as
    MariaDB's collation compares them. A key that is not text (SQLite) needs none: it was
    never sendable.
    """
    t = tombstones
    keyed = [(row, *read_text(row.key, "idempotency_key")) for row in rows]
    keys = [key for _row, key, defect in keyed if defect is None]
    known = conn.execute(sa.select(t.c.idempotency_key).where(t.c.idempotency_key.in_(keys)))
    buried = {key.casefold() for key in known.scalars()}
    stones = [
        {
            "idempotency_key": key,
            "fingerprint": row.payload_fingerprint,
            "final_state": row.state,
            "finished_at": row.updated_at,
            "purged_at": now,
        }
        for row, key, defect in keyed
        if defect is None and key.casefold() not in buried
    ]
    if stones:
        conn.execute(t.insert(), stones)


def purge_tombstones(conn: Connection, older_than: datetime, batch: int) -> int:
    """Delete one batch of tombstones of keys purged before a time ([retention]
    tombstone_days ago): from then on, such a key would be accepted again.
    """
    t = tombstones
    keys = (
        conn.execute(
            sa.select(t.c.idempotency_key)
            .where(t.c.purged_at < older_than)
            .order_by(t.c.purged_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )
    if keys:
        conn.execute(t.delete().where(t.c.idempotency_key.in_(keys)))
    return len(keys)
