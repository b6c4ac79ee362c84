"""Read-only queries the operator's console needs beyond ``Store.list_rows`` and ``status``.

Filters are bound parameters (and LIKE patterns escaped), never text built from a value, so a
filter such as ``' OR 1=1 --`` or ``%`` matches only rows that hold it. Rows are paged by
keyset (``id`` after the last one shown), never by OFFSET. This module writes nothing.
Imports only SQLAlchemy, the schema and the store's row views; never gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from outbox.schema import State, UTCDateTime, attempts, messages
from outbox.store.rows import RowView
from outbox.store.views import row_view, view_query
from outbox.vocabulary import HistoryDecision

m = messages

#: History decisions the overview's chart counts, by series.
ACTIVITY_SERIES: dict[str, tuple[str, ...]] = {
    "committed": (HistoryDecision.COMMIT.value, HistoryDecision.KEY_USED_BEFORE.value),
    "parked": (HistoryDecision.PARK.value,),
    "retried": (HistoryDecision.RETRY.value,),
}


@dataclass(frozen=True)
class RowFilter:
    """What the Rows page filters by; None (or empty) leaves a criterion out."""

    state: str | None = None
    park_reason: str | None = None
    method: str | None = None  # a full gRPC path, or its tail such as ``Wallet/Transfer``
    lane: str | None = None
    reference: str | None = None  # a prefix of the reference
    key_prefix: str | None = None
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    maybe_executed: bool | None = None
    oldest_first: bool = False
    after_id: int | None = None  # the keyset: rows past this id in the chosen order


@dataclass(frozen=True)
class RowPage:
    rows: list[RowView]
    next_after: int | None  # pass as ``after_id`` for the next page; None: no more rows


@dataclass(frozen=True)
class Activity:
    """Per-minute counts of the chart's series, oldest minute first."""

    start: datetime
    minutes: int
    series: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class BlockedLane:
    lane: str
    head: RowView  # the parked row that holds the lane
    waiting: int  # open rows behind it


#: LIKE's escape character: not "/" (SQLAlchemy's autoescape), which methods hold.
_ESCAPE = "!"


def _literal(value: str) -> str:
    """``value`` for a LIKE pattern, its wildcards matching only themselves."""
    for char in (_ESCAPE, "%", "_"):
        value = value.replace(char, _ESCAPE + char)
    return value


def _starts(column: Any, value: str) -> sa.ColumnElement[bool]:
    return column.like(_literal(value) + "%", escape=_ESCAPE)  # type: ignore[no-any-return]


def _method_clause(value: str) -> sa.ColumnElement[bool]:
    if value.startswith("/"):
        return m.c.method == value
    tail = _literal(value)  # "Market/PlaceOrder" ends "/recrypt.market.v1.Market/PlaceOrder"
    return sa.or_(
        m.c.method.like("%." + tail, escape=_ESCAPE), m.c.method.like("%/" + tail, escape=_ESCAPE)
    )


def _criteria(wanted: RowFilter) -> list[sa.ColumnElement[bool]]:
    exact: list[tuple[Any, Any]] = [
        (m.c.state, wanted.state),
        (m.c.park_reason, wanted.park_reason),
        (m.c.lane, wanted.lane),
        (m.c.maybe_executed, wanted.maybe_executed),
    ]
    found = [column == value for column, value in exact if value not in (None, "")]
    if wanted.method:
        found.append(_method_clause(wanted.method))
    if wanted.reference:
        found.append(_starts(m.c.reference, wanted.reference))
    if wanted.key_prefix:
        found.append(_starts(m.c.idempotency_key, wanted.key_prefix))
    if wanted.since is not None:
        found.append(m.c.created_at >= wanted.since)
    if wanted.until is not None:
        found.append(m.c.created_at < wanted.until)
    return found


def find_rows_query(base: sa.Select[Any], wanted: RowFilter, limit: int) -> sa.Select[Any]:
    """``base`` (the store's row view) filtered, ordered by age, one page plus one row."""
    query = base.where(*_criteria(wanted))
    if wanted.after_id is not None:
        query = query.where(
            m.c.id > wanted.after_id if wanted.oldest_first else m.c.id < wanted.after_id
        )
    order = m.c.id.asc() if wanted.oldest_first else m.c.id.desc()
    return query.order_by(order).limit(limit + 1)


def page_of(rows: Sequence[RowView], limit: int) -> RowPage:
    shown = list(rows[:limit])
    return RowPage(shown, shown[-1].id if len(rows) > limit and shown else None)


def activity(conn: Connection, start: datetime, minutes: int) -> Activity:
    """History lines per minute since ``start``, counted into ``ACTIVITY_SERIES`` by the
    database over ``ix_outbox_attempts_at`` (an index-only range: the lines of the window)."""
    rows = conn.execute(activity_query(conn.dialect.name, start)).all()
    series = {name: [0] * minutes for name in ACTIVITY_SERIES}
    for at, decision, count in rows:
        _count(series, decision, int(at), int(count))
    return Activity(start, minutes, series)


def activity_query(dialect: str, start: datetime) -> sa.Select[Any]:
    """(minute from ``start``, decision, lines) of the chart's decisions since ``start``."""
    decisions = [d for values in ACTIVITY_SERIES.values() for d in values]
    minute = _minute(dialect, start).label("minute")
    return (
        sa.select(minute, attempts.c.decision, sa.func.count())
        .where(attempts.c.at >= start, attempts.c.decision.in_(decisions))
        .group_by(minute, attempts.c.decision)
    )


def _minute(dialect: str, start: datetime) -> sa.ColumnElement[Any]:
    """Whole minutes from ``start`` to a line's ``at``, in the database."""
    since = sa.bindparam("chart_start", start, type_=UTCDateTime())
    if dialect == "postgresql":
        return sa.func.floor(sa.extract("epoch", attempts.c.at - since) / 60)
    if dialect == "sqlite":
        days = sa.func.julianday(attempts.c.at) - sa.func.julianday(since)
        return sa.cast(days * 1440, sa.Integer)
    return sa.func.timestampdiff(sa.text("MINUTE"), since, attempts.c.at)


def _count(series: dict[str, list[int]], decision: str, minute: int, count: int) -> None:
    for name, values in ACTIVITY_SERIES.items():
        if decision in values and 0 <= minute < len(series[name]):
            series[name][minute] += count


def blocked_lane_heads(conn: Connection, limit: int) -> list[tuple[str, int, int]]:
    """(lane, id of its first parked row, open rows behind it) for each blocked lane."""
    heads = conn.execute(
        sa.select(m.c.lane, sa.func.min(m.c.id))
        .where(m.c.state == State.PARKED, m.c.lane.is_not(None))
        .group_by(m.c.lane)
        .order_by(sa.func.min(m.c.id))
        .limit(limit)
    ).all()
    if not heads:
        return []
    waiting: dict[str, int] = dict(
        conn.execute(
            sa.select(m.c.lane, sa.func.count())
            .where(m.c.lane.in_([lane for lane, _ in heads]), m.c.state == State.PENDING)
            .group_by(m.c.lane)
        ).all()
    )
    return [(lane, int(head), int(waiting.get(lane, 0))) for lane, head in heads]


def find_rows(conn: Connection, wanted: RowFilter, limit: int) -> RowPage:
    """One page of rows matching ``wanted``, by keyset (the console's Rows page)."""
    query = find_rows_query(view_query(with_payload=False), wanted, limit)
    return page_of([row_view(row) for row in conn.execute(query)], limit)


def blocked_lanes(conn: Connection, limit: int) -> list[BlockedLane]:
    """Each lane held by a parked row: that row, and how many rows wait behind it."""
    heads = blocked_lane_heads(conn, limit)
    found = conn.execute(
        view_query(with_payload=False).where(m.c.id.in_([h for _, h, _ in heads]))
    ).all()
    rows = {row.id: row for row in map(row_view, found)}
    return [BlockedLane(str(lane), rows[head], n) for lane, head, n in heads]
