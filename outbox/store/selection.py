"""Rows an operator selects: a ``RowFilter`` as SQL criteria, keyset pages with the total
matching, and one row found by its key in any case, a unique key prefix or a reference.

Values are bound parameters and LIKE patterns are escaped, so a filter holding ``%`` or
``' OR 1=1`` matches only rows that hold it. Pages are keyset (``id`` below the last one
shown), never OFFSET. Reads only.

Imports SQLAlchemy, ``outbox.schema``, ``outbox.filters``, ``outbox.errors`` and the store's
own modules only.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from outbox.errors import OutboxError, RowNotFoundError
from outbox.filters import RowFilter, method_pattern
from outbox.schema import messages
from outbox.store.rows import RowPage, RowView
from outbox.store.views import get, row_view, view_query

m = messages
#: LIKE's escape character: not "/" (which methods hold) nor "\\" (MariaDB's own escape).
_ESCAPE = "!"
#: ``show`` by prefix: at least this many characters of a key.
MIN_KEY_PREFIX = 8
#: ``show`` lists at most this many candidates when a prefix or reference is ambiguous.
CANDIDATES = 10
_ALNUM_RUN = re.compile(r"[0-9a-z]+")


class AmbiguousRowError(OutboxError):
    """A prefix or reference that names several rows; ``candidates`` lists them."""

    def __init__(self, text: str, candidates: list[RowView]) -> None:
        self.candidates = candidates
        super().__init__(
            f"{text!r} matches {len(candidates)}{'+' if len(candidates) >= CANDIDATES else ''} "
            "rows: give more of the key (or the full key)"
        )


def _literal(value: str) -> str:
    for char in (_ESCAPE, "%", "_"):
        value = value.replace(char, _ESCAPE + char)
    return value


def _method_clause(method: str) -> sa.ColumnElement[bool]:
    exact, text = method_pattern(method)
    if exact:
        return m.c.method == text
    tail = _literal(text)  # Market/PlaceOrder ends /recrypt.market.v1.Market/PlaceOrder
    return sa.or_(
        m.c.method.like("%." + tail, escape=_ESCAPE),
        m.c.method.like("%/" + tail, escape=_ESCAPE),
    )


def key_prefix_clause(prefix: str) -> sa.ColumnElement[bool]:
    """Keys starting with ``prefix``: LIKE decides; a range over the leading letters and digits
    lets the unique index on the key find them (any collation sorts those in order)."""
    like = m.c.idempotency_key.like(_literal(prefix) + "%", escape=_ESCAPE)
    run = _ALNUM_RUN.match(prefix)
    if run is None:
        return like
    low = run.group()
    high = low[:-1] + chr(ord(low[-1]) + 1)
    return sa.and_(m.c.idempotency_key >= low, m.c.idempotency_key < high, like)


def criteria(wanted: RowFilter) -> list[sa.ColumnElement[bool]]:
    """The filter's criteria as SQL (every one bound)."""
    exact: list[tuple[Any, Any]] = [
        (m.c.state, wanted.state),
        (m.c.park_reason, wanted.park_reason),
        (m.c.lane, wanted.lane),
        (m.c.reference, wanted.reference),
        (m.c.maybe_executed, wanted.maybe_executed),
    ]
    found = [column == value for column, value in exact if value is not None]
    if wanted.method:
        found.append(_method_clause(wanted.method))
    if wanted.key_prefix:
        found.append(key_prefix_clause(wanted.key_prefix))
    return found + _time_criteria(wanted)


def _time_criteria(wanted: RowFilter) -> list[sa.ColumnElement[bool]]:
    bounds = [
        (m.c.created_at, wanted.created_since, wanted.created_until),
        (m.c.updated_at, wanted.updated_since, wanted.updated_until),
    ]
    found: list[sa.ColumnElement[bool]] = []
    for column, since, until in bounds:
        if since is not None:
            found.append(column >= since)
        if until is not None:
            found.append(column < until)
    return found


#: ``outbox list`` counts at most this many matching rows (``capped_count``).
COUNT_CAP = 10_000


def list_rows(conn: Connection, wanted: RowFilter, after: int | None, limit: int) -> RowPage:
    """One page, newest first, below ``after`` (an id), and the total matching."""
    query = view_query(with_payload=False).where(*criteria(wanted))
    if after is not None:
        query = query.where(m.c.id < after)
    found = conn.execute(query.order_by(m.c.id.desc()).limit(limit + 1)).all()
    rows = [row_view(row) for row in found[:limit]]
    more = len(found) > limit
    total, more_than = capped_count(conn, wanted)
    cursor = rows[-1].id if more and rows else None
    return RowPage(rows, total, cursor, more_than_total=more_than)


def capped_count(conn: Connection, wanted: RowFilter, cap: int | None = None) -> tuple[int, bool]:
    """How many rows match, read no further than ``cap`` of them; and whether more match.

    A page says "50 of 10,000+ rows" rather than count a million-row table on every ``list``
    (a filter by method alone, or none, has no index that counts it). Actions count exactly.
    """
    cap = COUNT_CAP if cap is None else cap
    matching = sa.select(m.c.id).where(*criteria(wanted)).limit(cap + 1).subquery()
    found = int(conn.execute(sa.select(sa.func.count()).select_from(matching)).scalar_one())
    return min(found, cap), found > cap


def count_rows(conn: Connection, wanted: RowFilter, states: Collection[str] = ()) -> int:
    """How many rows match (and are in one of ``states``, if given)."""
    count = sa.select(sa.func.count()).select_from(m).where(*criteria(wanted))
    if states:
        count = count.where(m.c.state.in_(sorted(states)))
    return int(conn.execute(count).scalar_one())


def matching_ids(
    conn: Connection,
    wanted: RowFilter,
    states: Collection[str],
    after: int | None,
    limit: int,
) -> list[tuple[int, str]]:
    """(id, key) of up to ``limit`` rows matching ``wanted`` in ``states``, below ``after``."""
    query = sa.select(m.c.id, m.c.idempotency_key).where(
        *criteria(wanted), m.c.state.in_(sorted(states))
    )
    if after is not None:
        query = query.where(m.c.id < after)
    found = conn.execute(query.order_by(m.c.id.desc()).limit(limit))
    return [(row.id, row.idempotency_key) for row in found]


def find_row(conn: Connection, text: str) -> RowView:
    """The row ``outbox show TEXT`` means: its key in any case, else a unique key prefix
    (at least ``MIN_KEY_PREFIX`` characters) or reference; several: ``AmbiguousRowError``."""
    for key in dict.fromkeys((text, text.lower())):
        try:
            return get(conn, key)
        except RowNotFoundError:
            pass
    candidates = _candidates(conn, text)
    if len(candidates) == 1:
        return get(conn, candidates[0].idempotency_key)
    if candidates:
        raise AmbiguousRowError(text, candidates)
    raise RowNotFoundError(
        f"no outbox row has idempotency_key {text}, a key starting with it "
        f"(at least {MIN_KEY_PREFIX} characters) or reference {text!r}"
    )


def _candidates(conn: Connection, text: str) -> list[RowView]:
    which = [m.c.reference == text]
    if len(text) >= MIN_KEY_PREFIX:
        which.append(key_prefix_clause(text.lower()))
    query = view_query(with_payload=False).where(sa.or_(*which)).order_by(m.c.id.desc())
    return [row_view(row) for row in conn.execute(query.limit(CANDIDATES))]


def rows_by_keys(conn: Connection, keys: Collection[str]) -> list[Any]:
    """(id, key, state, maybe_executed, park_reason) of the rows with these keys (unlocked)."""
    query = sa.select(
        m.c.id, m.c.idempotency_key, m.c.state, m.c.maybe_executed, m.c.park_reason
    ).where(m.c.idempotency_key.in_(list(keys)))
    return list(conn.execute(query).all())
