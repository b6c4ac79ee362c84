"""Claims (the dispatcher's): due rows taken under a lease, in the order they are due.

Rows due from their insertion come in id order, then retried and scheduled rows in ``due_at``
order (the range ``due_at <= now`` of ``ix_outbox_messages_due``: rows due later are never
read). A row of a lane is claimable only when its lane is free (``lane_free``); rows behind an
earlier open row of their lane are outside that range (``outbox.store.heads``).

Imports SQLAlchemy, ``outbox.schema``, ``outbox.payload`` and the store's own modules only.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from outbox.payload import fingerprint, read_text
from outbox.schema import OPEN_STATES, State, UTCDateTime, messages, tombstones
from outbox.store import heads as lane_heads
from outbox.store.columns import as_written, aware, first_due
from outbox.store.rows import Claim
from outbox.store.tx import retry_transient

m = messages
#: Claim statements kept per store (one per set of methods the gates exclude).
_CLAIMS_KEPT = 16
#: The writers' text columns a claim reads, in Claim's field names.
_WRITER_TEXT = ("idempotency_key", "method", "payload", "lane")


@dataclass(frozen=True)
class Excluded:
    """What a claim leaves out: methods (gates, holds) and lanes (holds)."""

    methods: frozenset[str] = frozenset()
    lanes: frozenset[str] = frozenset()


class Claimer:
    """The claims of one store: PostgreSQL's claim statements, built once, and the lane sort's
    pace (``sort_new_lane_rows``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._statements: dict[Excluded, sa.Update] = {}  # PostgreSQL's claims
        self._next_sort = 0.0  # time.monotonic() when a claim next sorts new lane rows
        self._sorting = False  # the last sort found rows: more may wait

    @retry_transient
    def claim_due(
        self,
        worker: str,
        batch: int,
        lease: float,
        now: datetime,
        *,
        exclude_methods: Collection[str] = (),
        exclude_lanes: Collection[str] = (),
    ) -> list[Claim]:
        """Claim up to ``batch`` due rows under a lease for ``worker``, in the order they are due.

        The claim first sorts, in the same transaction, the laned rows no daemon has sorted
        yet (a bounded number, at most every ``SORT_EVERY`` s: ``outbox.store.heads``).
        PostgreSQL and MariaDB lock with ``FOR UPDATE SKIP LOCKED`` so daemons share work;
        SQLite holds the database write lock (``BEGIN IMMEDIATE``) for the transaction.
        The fingerprint of method and payload is stored at the first claim, before any send.
        It never fails on one row's data: what cannot be read is the claim's ``defect``.
        Rows of ``exclude_methods`` (gates, holds) and ``exclude_lanes`` (holds) stay.
        """
        expires = now + timedelta(seconds=lease)
        excluded = Excluded(frozenset(exclude_methods), frozenset(exclude_lanes))
        if self.engine.dialect.name == "postgresql":
            return self._claim_returning(worker, batch, now, expires, excluded)
        with self.engine.begin() as conn:
            self.sort_new_lane_rows(conn)
            rows = conn.execute(due_query(batch, now, excluded)).all()
            claims = [claim_from(row, worker) for row in rows]
            _take(conn, claims, worker, expires, now)
        return claims

    def sort_new_lane_rows(self, conn: Connection) -> None:
        """At most every ``SORT_EVERY`` seconds, or at every claim while a burst is sorted: a
        row not sorted yet is a candidate the claim checks anyway, so sorting can wait, and a
        claim every few rows does not pay for an empty sort each time."""
        if self._sorting or time.monotonic() >= self._next_sort:
            self._sorting = lane_heads.sort_new_rows(conn) > 0
            self._next_sort = time.monotonic() + lane_heads.SORT_EVERY

    def _claim_returning(
        self,
        worker: str,
        batch: int,
        now: datetime,
        expires: datetime,
        excluded: Excluded,
    ) -> list[Claim]:
        """PostgreSQL: the whole claim in one statement (built once), the fingerprint in SQL."""
        params = {"c_worker": worker, "c_batch": batch, "c_now": now, "c_lease_expires": expires}
        with self.engine.begin() as conn:  # in the claim's order, as the other databases return
            self.sort_new_lane_rows(conn)
            found = conn.execute(self._statement(excluded), params).all()
            rows = sorted(found, key=lambda row: (row.due_at, row.id))
        return [claim_from(row, worker, current=row.current) for row in rows]

    def _statement(self, key: Excluded) -> sa.Update:
        """The claim for one set of excluded methods and lanes, built at its first use, kept."""
        statement = self._statements.get(key)
        if statement is None:
            if len(self._statements) >= _CLAIMS_KEPT:  # gates changed many times: start over
                self._statements.clear()
            statement = self._statements[key] = build_claim(key)
        return statement


def _take(
    conn: Connection, claims: Sequence[Claim], worker: str, expires: datetime, now: datetime
) -> None:
    """MariaDB, SQLite: the selected (locked) rows go in flight, one parameter set per row."""
    if not claims:
        return
    conn.execute(
        m.update()
        .where(m.c.id == sa.bindparam("b_id"), m.c.state == State.PENDING)
        .values(
            state=State.INFLIGHT,
            lease_owner=worker,
            lease_expires_at=expires,
            updated_at=now,
            lane_behind=False,
            payload_fingerprint=sa.func.coalesce(m.c.payload_fingerprint, sa.bindparam("b_fp")),
            # the payload as first sent: MariaDB assigns in order, so the claim's own reading
            # of the fingerprint (not the column just set) says whether this is the first
            first_payload=sa.case((sa.bindparam("b_first"), m.c.payload), else_=m.c.first_payload),
        ),
        [
            {"b_id": c.id, "b_fp": c.fingerprint, "b_first": c.stored_fingerprint is None}
            for c in claims
        ],
    )


def build_claim(excluded: Excluded) -> sa.Update:
    """PostgreSQL: ``UPDATE … RETURNING`` of the due rows, its values bound at each claim.

    ``payload::text`` of a jsonb value is canonical, so the SHA-256 of the method, a newline
    and that text binds the key to one request (as ``outbox.payload.fingerprint`` does in
    Python); the row keeps the first one, and ``current`` is compared with it on every claim.
    """
    now = sa.bindparam("c_now", type_=UTCDateTime())
    batch = sa.bindparam("c_batch", type_=sa.Integer())
    # the due rows' selection takes values; bound parameters make it reusable
    due = (
        due_query(cast(int, batch), cast(datetime, now), excluded)
        .with_only_columns(m.c.id, m.c.due_at, m.c.payload_fingerprint)
        .subquery("due")
    )
    # RETURNING gives the row as updated: the fingerprint comes from ``due``, as it was before
    # (None at the first claim, as the other databases read it: the first send is known).
    returned = [c for c in claim_columns() if c is not m.c.payload_fingerprint]
    request = m.c.method + "\n" + sa.cast(m.c.payload, sa.Text)
    current = sa.func.encode(sa.func.sha256(sa.func.convert_to(request, "UTF8")), "hex")
    return (
        m.update()
        .where(m.c.id == due.c.id)
        .values(
            state=State.INFLIGHT,
            lease_owner=sa.bindparam("c_worker", type_=sa.String()),
            lease_expires_at=sa.bindparam("c_lease_expires", type_=UTCDateTime()),
            updated_at=now,
            lane_behind=False,
            payload_fingerprint=sa.func.coalesce(m.c.payload_fingerprint, current),
            first_payload=sa.case(
                (m.c.payload_fingerprint.is_(None), m.c.payload), else_=m.c.first_payload
            ),
        )
        .returning(*returned, due.c.payload_fingerprint, current.label("current"), due.c.due_at)
    )


def due_query(batch: int, now: datetime, excluded: Excluded | None = None) -> sa.Select[Any]:
    """The claim's selection: up to ``batch`` due rows whose lane is free, locked, skipping
    rows another transaction holds, and rows of the methods and lanes ``excluded``."""
    query = (
        sa.select(*claim_columns())
        .where(
            m.c.due_at <= now,  # only a pending row that is not waiting has one (0008)
            sa.or_(m.c.expires_at.is_(None), m.c.expires_at > now),
            lane_free(),
        )
        .order_by(m.c.due_at, m.c.id)
        .limit(batch)
        .with_for_update(skip_locked=True, of=m)
    )
    if excluded and excluded.methods:
        query = query.where(m.c.method.not_in(sorted(excluded.methods)))
    if excluded and excluded.lanes:
        held = m.c.lane.not_in(sorted(excluded.lanes))
        query = query.where(sa.or_(m.c.lane.is_(None), held))
    return query


def claim_columns() -> tuple[Any, ...]:
    """What a claim reads of each row: the writers' columns as written (validated, never
    trusted), the daemon's counters, and when a row with the same key was purged, if one was.
    """
    spent = (
        sa.select(tombstones.c.purged_at)
        .where(tombstones.c.idempotency_key == m.c.idempotency_key)
        .scalar_subquery()
    )
    return (
        m.c.id,
        as_written(m.c.idempotency_key).label("idempotency_key"),
        as_written(m.c.method).label("method"),
        as_written(sa.cast(m.c.payload, sa.Text)).label("payload"),
        as_written(m.c.lane).label("lane"),
        m.c.attempts,
        m.c.unknown_attempts,
        m.c.maybe_executed,
        m.c.payload_fingerprint,
        spent.label("key_purged_at"),
        # raw values, read by ``aware`` and ``_traceparent``: a bad one never fails the claim
        sa.type_coerce(first_due(), sa.types.NullType()).label("due_since"),
        as_written(m.c.traceparent).label("traceparent"),
    )


def lane_free() -> sa.ColumnElement[bool]:
    """A lane's row is claimable when no row of its lane is in flight and no earlier one is open.

    "No earlier row open" alone is not enough: a writer that commits late makes a row with a
    smaller id appear after a later row of its lane was claimed; without the first condition
    both would be in flight at once, the late one overtaking. Both probes are index lookups
    (``uq_outbox_messages_inflight_lane``, ``ix_outbox_messages_lane_open``). A concurrent
    claim that neither probe can see yet is stopped by the unique index (``tx.transient``).
    """
    busy, earlier = m.alias("busy"), m.alias("earlier")
    return sa.or_(
        m.c.lane.is_(None),
        sa.and_(
            # IS NOT NULL: a plan that hashes this subquery reads only the inflight rows
            ~sa.exists().where(busy.c.inflight_lane.is_not(None), busy.c.inflight_lane == m.c.lane),
            ~sa.exists().where(
                earlier.c.lane == m.c.lane,
                earlier.c.id < m.c.id,
                earlier.c.state.in_([s.value for s in OPEN_STATES]),
            ),
        ),
    )


def claim_from(row: sa.Row[Any], worker: str, *, current: str | None = None) -> Claim:
    """A claim from a selected row; ``current`` is the fingerprint if SQL computed it.

    Never raises on the row's data: a writer column that is not text becomes the claim's
    ``defect`` (the dispatcher parks the row), and ``fingerprint`` never raises.
    """
    text, defect = _writer_text_of(row)
    return Claim(
        id=row.id,
        **text,
        attempts=row.attempts,
        maybe_executed=bool(row.maybe_executed),
        worker=worker,
        stored_fingerprint=row.payload_fingerprint,
        fingerprint=current or fingerprint(row.method, row.payload),
        unknown_attempts=row.unknown_attempts,
        defect=defect,
        key_purged_at=aware(row.key_purged_at),
        due_since=_time_or_none(row.due_since),
        traceparent=read_text(row.traceparent, "traceparent")[0],
    )


def _time_or_none(value: Any) -> datetime | None:
    """A stored time as aware UTC, or None when it cannot be read as one (metrics skip it)."""
    found = aware(value)
    return found if isinstance(found, datetime) else None


def _writer_text_of(row: sa.Row[Any]) -> tuple[dict[str, Any], str | None]:
    """The writers' columns of a claimed row as text, and the first defect found, if any."""
    text: dict[str, Any] = {}
    defects = []
    for column in _WRITER_TEXT:
        text[column], defect = read_text(getattr(row, column), column)
        defects.append(defect)
    return text, next((d for d in defects if d), None)
