"""Reading (operators', gauges', ``outbox check``): rows, history, status, workers, retries.

Every query here is a read on an index: the gauges run every 15 s and never scan the table
(``outbox.store.plans`` shows their plans; EXPLAIN tests guard them). A view never fails on
what a column holds: ``outbox show`` must work on any row.

Imports SQLAlchemy, ``outbox.schema``, ``outbox.payload`` and the store's own modules only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from outbox.errors import RowNotFoundError
from outbox.payload import read_text
from outbox.schema import OPEN_STATES, State, UTCDateTime, attempts, messages, workers
from outbox.store.approvals import count_open
from outbox.store.columns import DUE_NOW_AT, INFLIGHT, PENDING, as_written, aware, first_due
from outbox.store.counts import state_counts
from outbox.store.holds import list_holds
from outbox.store.rows import (
    HistoryLine,
    RetryingView,
    RowView,
    StatusView,
    WorkerView,
    failures_from_json,
)

m = messages
RETRYING_MESSAGE_CUT = 200  # characters of a last message ``retrying`` reads, at most

_VIEW_COLUMNS = [
    "id",
    "idempotency_key",
    "method",
    "state",
    "attempts",
    "last_code",
    "last_message",
    "park_reason",
    "maybe_executed",
    "lane",
    "reference",
    "not_before",
    "expires_at",
    "next_attempt_at",
    "created_at",
    "updated_at",
    "committed_at",
    "lease_owner",
]

#: The writers' text columns an operator view reads as written (SQLite may hold any bytes).
#: (``first_payload`` is the payload copied at the first claim: whatever bytes it held.)
_VIEW_WRITER_TEXT = frozenset(
    {"idempotency_key", "method", "lane", "reference", "payload", "first_payload"}
)
#: The view's timestamp columns: only these are read as times (a reference may look like one).
_VIEW_TIMES = frozenset(c.name for c in m.c if isinstance(c.type, UTCDateTime))


# ---- one row, many rows


def get(conn: Connection, key: str) -> RowView:
    row = conn.execute(view_query(with_payload=True).where(m.c.idempotency_key == key)).first()
    if row is None:
        raise RowNotFoundError(f"no outbox row has idempotency_key {key}")
    return row_view(row)


def history(conn: Connection, key: str) -> list[HistoryLine]:
    a = attempts
    rows = conn.execute(
        sa.select(a.c.at, a.c.kind, a.c.actor, a.c.code, a.c.message, a.c.decision, a.c.duration_ms)
        .join(m, m.c.id == a.c.message_id)
        .where(m.c.idempotency_key == key)
        .order_by(a.c.id)
    ).all()
    return [HistoryLine(**row._mapping) for row in rows]


def view_query(*, with_payload: bool) -> sa.Select[Any]:
    columns: list[Any] = [
        as_written(m.c[name]).label(name) if name in _VIEW_WRITER_TEXT else m.c[name]
        for name in _VIEW_COLUMNS
    ]
    if with_payload:
        columns += [
            as_written(sa.cast(m.c.payload, sa.Text)).label("payload"),
            sa.cast(m.c.response, sa.Text).label("response"),
            as_written(sa.cast(m.c.first_payload, sa.Text)).label("first_payload"),
        ]
    return sa.select(*columns)


def row_view(row: sa.Row[Any]) -> RowView:
    """A row for operators; never fails on what a column holds (``outbox show`` must work)."""
    data = {k: aware(v) if k in _VIEW_TIMES else v for k, v in row._mapping.items()}
    for name in _VIEW_WRITER_TEXT & data.keys():
        data[name] = read_text(data[name], name)[0]  # bytes that are not UTF-8: a placeholder
    data["maybe_executed"] = bool(data["maybe_executed"])
    return RowView(**data)


# ---- status


def status(conn: Connection, now: datetime) -> StatusView:
    counts, estimated = state_counts(conn)  # above 10,000 rows a state's count is an estimate
    firsts = conn.execute(oldest_due_query(now)).one()
    expired, oldest_expiry = conn.execute(expired_leases_query(now)).one()
    maybe = conn.execute(maybe_executed_open_query()).scalar_one()
    return StatusView(
        counts=counts,
        estimated=frozenset(estimated),
        oldest_due_at=min((t for t in map(aware, firsts) if isinstance(t, datetime)), default=None),
        parked_by_reason=_parked_by_reason(conn),
        blocked_lanes=_blocked_lanes(conn),
        maybe_executed_open=int(maybe),
        workers=list_workers(conn),
        leases_expired=int(expired),
        oldest_lease_expired_at=aware(oldest_expiry),
        holds=list_holds(conn),
        approvals_open=count_open(conn),
    )


def maybe_executed_open_query() -> sa.Select[int]:
    """Open rows that may have executed: over ``ix_outbox_messages_maybe_executed`` only."""
    return sa.select(sa.func.count()).where(
        m.c.maybe_executed == sa.true(),  # "= true": the partial index's "maybe_executed"
        m.c.state.in_([s.value for s in OPEN_STATES]),
    )


def _parked_by_reason(conn: Connection) -> dict[str, int]:
    found = conn.execute(
        sa.select(m.c.park_reason, sa.func.count())
        .where(m.c.state == State.PARKED)
        .group_by(m.c.park_reason)
    ).all()
    parked = {reason or "unknown": int(count) for reason, count in found}
    return {str(k): int(v) for k, v in parked.items()}


def _blocked_lanes(conn: Connection) -> list[str]:
    """Lanes with a parked row: nothing after it is sent until an operator acts."""
    found = conn.execute(
        sa.select(as_written(m.c.lane))
        .where(m.c.state == State.PARKED, m.c.lane.is_not(None))
        .distinct()
    ).scalars()
    return sorted(read_text(lane, "lane")[0] for lane in found)


def oldest_due_query(now: datetime) -> sa.Select[Any]:
    """When the oldest due row became due, as two index reads on ``ix_outbox_messages_due``
    (the gauge runs every 15 s: it never scans). Rows due from insertion (``DUE_NOW``): the
    insertion of the first in id order. Rows with a time: the first in ``due_at`` order, as
    its retry time, else the later of ``not_before`` and its insertion."""
    first_due_now = (
        sa.select(m.c.created_at)
        .where(m.c.due_at == DUE_NOW_AT)  # only a candidate has a due_at
        .order_by(m.c.due_at, m.c.id)
        .limit(1)
    )
    first_timed = (
        sa.select(sa.func.coalesce(m.c.next_attempt_at, first_due()))
        .where(m.c.due_at > DUE_NOW_AT, m.c.due_at <= now)
        .order_by(m.c.due_at, m.c.id)
        .limit(1)
    )
    return sa.select(
        first_due_now.scalar_subquery().label("due_now"),
        first_timed.scalar_subquery().label("timed"),
    )


def expired_leases_query(now: datetime) -> sa.Select[int, Any]:
    """Rows in flight whose lease ran out before ``now``, and the earliest lease end: over
    ``ix_outbox_messages_lease`` only (partial on in-flight rows where it can be)."""
    return sa.select(sa.func.count(), sa.func.min(m.c.lease_expires_at)).where(
        m.c.state == INFLIGHT, m.c.lease_expires_at < now
    )


# ---- workers


def list_workers(conn: Connection) -> list[WorkerView]:
    rows = conn.execute(sa.select(workers).order_by(workers.c.started_at)).all()
    return [_worker(row) for row in rows]


def _worker(row: sa.Row[Any]) -> WorkerView:
    data = {k: aware(v) if isinstance(v, datetime) else v for k, v in row._mapping.items()}
    data["refused_methods"] = tuple(p for p in (data["refused_methods"] or "").split(",") if p)
    data["failing_jobs"] = failures_from_json(data["failing_jobs"])
    return WorkerView(**data)


def database_now(conn: Connection) -> datetime:
    """The database server's clock (UTC): the one clock every daemon shares."""
    now: Any = {
        "sqlite": sa.func.strftime("%Y-%m-%d %H:%M:%f", "now"),
        "postgresql": sa.func.statement_timestamp(),
    }.get(conn.dialect.name, sa.func.utc_timestamp(6))
    return aware(conn.execute(sa.select(now)).scalar_one())  # type: ignore[no-any-return]


# ---- retries (``outbox check``)


def retrying(conn: Connection, due_before: datetime, attempts: int) -> RetryingView:
    """Pending rows Recrypt has answered that first became due before ``due_before``, and
    pending rows with at least ``attempts`` attempts: counts, the oldest, the commonest
    last answer. One query, over the pending rows' index only (``outbox check``)."""
    return _retrying_view(conn.execute(retrying_query(due_before, attempts)).all())


def retrying_query(due_before: datetime, attempts: int) -> sa.Select[Any]:
    """Per last_code: pending rows answered and first due before ``due_before`` (long), or
    with at least ``attempts`` attempts (many). A rate-limit answer hands a row back without
    counting an attempt, so "answered" is an attempt counted or a last code."""
    answered = sa.or_(m.c.attempts > 0, m.c.last_code.is_not(None))
    cutoff = sa.bindparam("due_before", due_before, type_=UTCDateTime())
    long = sa.and_(answered, first_due() <= cutoff)
    many = m.c.attempts >= sa.bindparam("attempts", attempts, type_=sa.Integer())
    return (
        sa.select(
            m.c.last_code,
            sa.func.count().label("rows"),
            sa.func.sum(sa.case((long, 1), else_=0)).label("long"),
            sa.func.min(sa.case((long, first_due()))).label("first_due"),
            sa.func.sum(sa.case((many, 1), else_=0)).label("many"),
            sa.func.max(sa.case((many, m.c.attempts))).label("most"),
            sa.func.min(sa.func.substr(m.c.last_message, 1, RETRYING_MESSAGE_CUT)).label("message"),
        )
        .where(m.c.state == PENDING, sa.or_(long, many))
        .group_by(m.c.last_code)
    )


def _retrying_view(groups: Sequence[sa.Row[Any]]) -> RetryingView:
    if not groups:
        return RetryingView()
    top = min(groups, key=lambda g: (-int(g.rows), g.last_code is None, g.last_code or ""))
    firsts = [t for g in groups if isinstance(t := aware(g.first_due), datetime)]
    return RetryingView(
        rows=sum(int(g.rows) for g in groups),
        long=sum(int(g.long or 0) for g in groups),
        first_due_at=min(firsts, default=None),
        many=sum(int(g.many or 0) for g in groups),
        most_attempts=max(int(g.most or 0) for g in groups),
        code=top.last_code,
        code_rows=int(top.rows),
        message=top.message,
    )
