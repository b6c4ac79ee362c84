"""The store: every SQL statement of the outbox lives here, as named operations.

Each state transition is one guarded UPDATE: the expected state (and, for a claimed row, the
lease owner) is in the WHERE clause, and the affected row count tells a stale worker that it
lost the row instead of letting it overwrite a newer outcome (River's ``…IfRunning`` pattern).
The store knows rows and states; it never knows gRPC.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
import tenacity
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql import visitors
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter

from outbox.clock import utcnow
from outbox.errors import DuplicateKeyError, OperatorActionError, RowNotFoundError
from outbox.payload import bounded, fingerprint, read_text
from outbox.schema import (
    DUE_NOW,
    FINISHED_STATES,
    OPEN_STATES,
    State,
    UTCDateTime,
    attempts,
    lanes,
    messages,
    tombstones,
    workers,
)
from outbox.store import console_views as views
from outbox.store import heads as lane_heads
from outbox.store.rows import (
    Call,
    Claim,
    Committed,
    HandedBack,
    HistoryLine,
    NewRow,
    Outcome,
    Parked,
    Retry,
    RetryingView,
    RowView,
    StatusView,
    WorkerBeat,
    WorkerView,
    failures_from_json,
    failures_json,
)
from outbox.vocabulary import HistoryDecision, HistoryKind

__all__ = [
    "Call",
    "Claim",
    "Committed",
    "HandedBack",
    "HistoryLine",
    "NewRow",
    "Outcome",
    "Parked",
    "Retry",
    "RetryingView",
    "RowView",
    "StatusView",
    "Store",
    "WorkerBeat",
    "WorkerView",
    "enqueue_row",
    "lock_lane",
    "new_key",
    "retry_transient",
]

log = logging.getLogger("outbox.store")
m = messages

# MySQL/MariaDB: 1213 deadlock, 1205 lock wait timeout; PostgreSQL: 40P01 deadlock, 40001
# serialization failure; SQLite: "database is locked" past the busy timeout.
_TRANSIENT_CODES = {1213, 1205, "40P01", "40001"}


#: The index that keeps one row of a lane in flight (migration 0005), as every database names
#: it in a unique violation: PostgreSQL and MariaDB give the index, SQLite the column.
_LANE_RACE = "inflight_lane"


def _transient(exc: BaseException) -> bool:
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
    retry=tenacity.retry_if_exception(_transient),
    stop=tenacity.stop_after_attempt(5),
    wait=tenacity.wait_random_exponential(multiplier=0.01, max=0.5),
    reraise=True,
)


# --------------------------------------------------------------------------- writers


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
    name = _dialect_of(conn)
    if lane is None or name == "sqlite":
        return
    if name == "postgresql":
        conn.execute(postgresql.insert(lanes).values(lane=lane).on_conflict_do_nothing())
    else:
        upsert = mysql.insert(lanes).values(lane=lane)
        conn.execute(upsert.on_duplicate_key_update(lane=upsert.inserted.lane))
    conn.execute(sa.select(lanes.c.lane).where(lanes.c.lane == lane).with_for_update())


def _dialect_of(conn: Connection | Session) -> str:
    return conn.get_bind().dialect.name if isinstance(conn, Session) else conn.dialect.name


def enqueue_row(
    conn: Connection | Session, row: NewRow, now: datetime, *, serialise_lane: bool = True
) -> None:
    """Insert one row on the caller's connection, inside the caller's transaction.

    A key already in the outbox, or spent by a row that retention purged (a tombstone), is
    refused: Recrypt deduplicates by key, so the new row would "commit" without its effect.
    """
    lock_lane(conn, row.lane if serialise_lane else None)
    _refuse_spent_key(conn, row.idempotency_key)
    exists = conn.execute(
        sa.select(m.c.id).where(m.c.idempotency_key == row.idempotency_key)
    ).first()
    if exists is not None:
        raise DuplicateKeyError(
            f"idempotency_key {row.idempotency_key} is already in the outbox (row {exists.id}); "
            "a key is sent once: use a new key for a new transfer"
        )
    try:
        conn.execute(m.insert().values(**asdict(row), created_at=now, updated_at=now))
    except sa.exc.IntegrityError as exc:
        raise DuplicateKeyError(
            f"idempotency_key {row.idempotency_key} is already in the outbox (inserted "
            "concurrently); use a new key for a new transfer"
        ) from exc


def _refuse_spent_key(conn: Connection | Session, key: str) -> None:
    t = tombstones
    purged = conn.execute(sa.select(t.c.purged_at).where(t.c.idempotency_key == key)).scalar()
    if purged is not None:
        raise DuplicateKeyError(
            f"idempotency_key {key} was used by a row purged on {_aware(purged):%Y-%m-%d}; "
            "Recrypt may still hold that request under the key, so it is never sent again: "
            "use a new key for a new transfer"
        )


# --------------------------------------------------------------------------- the store


class Store:
    """Named operations over one engine. Each public method is one transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._claims: dict[frozenset[str], sa.Update] = {}  # PostgreSQL's claim statements
        self._next_sort = 0.0  # time.monotonic() when a claim next sorts new lane rows
        self._sorting = False  # the last sort found rows: more may wait

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # ---- the dispatcher's operations

    @retry_transient
    def claim_due(
        self,
        worker: str,
        batch: int,
        lease: float,
        now: datetime,
        *,
        exclude_methods: Collection[str] = (),
    ) -> list[Claim]:
        """Claim up to ``batch`` due rows under a lease for ``worker``: rows due from their
        insertion in id order, then retried and scheduled rows in ``due_at`` order (the range
        ``due_at <= now`` of ``ix_outbox_messages_due``: rows due later are never read).

        Rows of a lane behind an earlier open row are outside that range (``lane_behind``):
        the claim first sorts, in the same transaction, the laned rows no daemon has sorted
        yet (a bounded number, at most every ``SORT_EVERY`` s: ``outbox.store.heads``).

        PostgreSQL and MariaDB lock with ``FOR UPDATE SKIP LOCKED`` so daemons share work;
        SQLite holds the database write lock (``BEGIN IMMEDIATE``) for the transaction.
        The fingerprint of method and payload is stored at the first claim, before any send.
        It never fails on one row's data: what cannot be read is the claim's ``defect``.
        """
        if self.dialect == "postgresql":
            return self._claim_returning(worker, batch, lease, now, exclude_methods)
        with self._tx() as conn:
            self._sort_new_lane_rows(conn)
            rows = conn.execute(self._due_query(batch, now, exclude_methods)).all()
            if not rows:
                return []
            claims = [self._claim_from(row, worker) for row in rows]
            conn.execute(
                m.update()
                .where(m.c.id == sa.bindparam("b_id"), m.c.state == State.PENDING)
                .values(
                    state=State.INFLIGHT,
                    lease_owner=worker,
                    lease_expires_at=now + timedelta(seconds=lease),
                    updated_at=now,
                    lane_behind=False,
                    payload_fingerprint=sa.func.coalesce(
                        m.c.payload_fingerprint, sa.bindparam("b_fp")
                    ),
                ),
                [{"b_id": c.id, "b_fp": c.fingerprint} for c in claims],
            )
        return claims

    def _sort_new_lane_rows(self, conn: Connection) -> None:
        """At most every ``SORT_EVERY`` seconds, or at every claim while a burst is sorted: a
        row not sorted yet is a candidate the claim checks anyway, so sorting can wait, and a
        claim every few rows does not pay for an empty sort each time."""
        if self._sorting or time.monotonic() >= self._next_sort:
            self._sorting = lane_heads.sort_new_rows(conn) > 0
            self._next_sort = time.monotonic() + lane_heads.SORT_EVERY

    @retry_transient
    def sort_lanes(self, limit: int = lane_heads.SORT_LIMIT) -> int:
        """Sort up to ``limit`` laned rows no daemon has sorted yet (each claim does it too)."""
        with self._tx() as conn:
            return lane_heads.sort_new_rows(conn, limit)

    @retry_transient
    def settle_lanes(self) -> int:
        """Release the first waiting row of every lane whose earlier rows were all finished
        outside the daemon (``outbox.store.heads.settle_waiting_lanes``); how many."""
        with self._tx() as conn:
            return lane_heads.settle_waiting_lanes(conn)

    def _claim_returning(
        self,
        worker: str,
        batch: int,
        lease: float,
        now: datetime,
        exclude_methods: Collection[str],
    ) -> list[Claim]:
        """PostgreSQL: the whole claim in one statement (built once), the fingerprint in SQL."""
        params = {
            "c_worker": worker,
            "c_batch": batch,
            "c_now": now,
            "c_lease_expires": now + timedelta(seconds=lease),
        }
        with self._tx() as conn:  # in the claim's order, as the other databases return them
            self._sort_new_lane_rows(conn)
            found = conn.execute(self._claim_statement(exclude_methods), params).all()
            rows = sorted(found, key=lambda row: (row.due_at, row.id))
        return [self._claim_from(row, worker, current=row.current) for row in rows]

    def _claim_statement(self, exclude_methods: Collection[str]) -> sa.Update:
        """The claim for one set of excluded methods, built at its first use and kept."""
        key = frozenset(exclude_methods)
        statement = self._claims.get(key)
        if statement is None:
            if len(self._claims) >= _CLAIMS_KEPT:  # gates changed many times: start over
                self._claims.clear()
            statement = self._claims[key] = self._build_claim(key)
        return statement

    def _build_claim(self, exclude_methods: Collection[str]) -> sa.Update:
        """``UPDATE … RETURNING`` of the due rows, its values bound at each claim.

        ``payload::text`` of a jsonb value is canonical, so the SHA-256 of the method, a newline
        and that text binds the key to one request (as ``outbox.payload.fingerprint`` does in
        Python); the row keeps the first one, and ``current`` is compared with it on every claim.
        """
        now = sa.bindparam("c_now", type_=UTCDateTime())
        batch = sa.bindparam("c_batch", type_=sa.Integer())
        # the due rows' selection takes values; bound parameters make it reusable
        due = (
            self._due_query(cast(int, batch), cast(datetime, now), exclude_methods)
            .with_only_columns(m.c.id, m.c.due_at)
            .subquery("due")
        )
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
            )
            .returning(*_claim_columns(), current.label("current"), due.c.due_at)
        )

    def _due_query(
        self, batch: int, now: datetime, exclude_methods: Collection[str]
    ) -> sa.Select[Any]:
        query = (
            sa.select(*_claim_columns())
            .where(
                m.c.due_at <= now,  # only a pending row that is not waiting has one (0008)
                sa.or_(m.c.expires_at.is_(None), m.c.expires_at > now),
                _lane_free(),
            )
            .order_by(m.c.due_at, m.c.id)
            .limit(batch)
            .with_for_update(skip_locked=True, of=m)
        )
        if exclude_methods:
            query = query.where(m.c.method.not_in(list(exclude_methods)))
        return query

    @staticmethod
    def _claim_from(row: sa.Row[Any], worker: str, *, current: str | None = None) -> Claim:
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
            key_purged_at=_aware(row.key_purged_at),
        )

    def record(self, outcomes: Sequence[Outcome], now: datetime) -> list[Outcome]:
        """Record a batch of outcomes; returns those whose row was lost to another worker.

        One transaction for the batch. If the database refuses one row's data, the batch is
        recorded row by row and the refused outcome parks its row ``bad_row`` with a fixed
        message: one row never loses the others' outcomes, whose calls have executed.
        A connection-level error is raised (nothing of that transaction was recorded): the
        caller records the same outcomes again later, which the guarded UPDATEs make safe.
        """
        if not outcomes:
            return []
        try:
            return self._record_batch(outcomes, now)
        except sa.exc.StatementError as exc:
            if _connection_level(exc):
                raise
        return [lost for outcome in outcomes for lost in self._record_alone(outcome, now)]

    def _record_alone(self, outcome: Outcome, now: datetime) -> list[Outcome]:
        """One outcome in its own transaction; if its data is refused, a fixed-message park."""
        try:
            return self._record_batch([outcome], now)
        except sa.exc.StatementError as exc:
            if _connection_level(exc):
                raise
            error = _error_name(exc)
        log.error("event=record_refused row=%s error=%s then=park_bad_row", outcome.claim.id, error)
        return [outcome] if self._record_batch([_refused(outcome, error)], now) else []

    @retry_transient
    def _record_batch(self, outcomes: Sequence[Outcome], now: datetime) -> list[Outcome]:
        """One transaction: the guarded transitions of the rows this worker still holds (the
        others were taken over after our lease ran out, and their newer outcome stands) and
        their history lines. PostgreSQL: one statement per kind of outcome for the batch;
        the others: one locking SELECT, one UPDATE per kind of outcome with a parameter set
        per row (executemany), and one INSERT of history lines.
        """
        with self._tx() as conn:
            if self.dialect == "postgresql":
                held = _record_json(conn, outcomes, now)
            else:
                held = _record_rows(conn, outcomes, now)
            finished = [o for o in outcomes if _finishes_a_lane_row(o)]
            lane_heads.settle(conn, [o.claim.id for o in finished if _claim_token(o.claim) in held])
        return [o for o in outcomes if _claim_token(o.claim) not in held]

    @retry_transient
    def renew_leases(self, worker: str, ids: Collection[int], lease: float, now: datetime) -> int:
        """Extend the lease of rows this worker still holds (long calls)."""
        if not ids:
            return 0
        with self._tx() as conn:
            done = conn.execute(
                m.update()
                .where(
                    m.c.id.in_(list(ids)), m.c.state == State.INFLIGHT, m.c.lease_owner == worker
                )
                .values(lease_expires_at=now + timedelta(seconds=lease))
            )
        return done.rowcount

    @retry_transient
    def release_expired_leases(
        self, now: datetime, limit: int = 500, *, max_unknown_attempts: int = 10
    ) -> list[str]:
        """The reaper: inflight rows whose lease ran out go back to pending, maybe executed.

        The worker died or hung mid-call, so the call may have executed: the row is resent
        with the same key (safe) and counts an attempt whose outcome is unknown. A release that
        would reach ``max_unknown_attempts`` ([retry] max_unknown_attempts; 10 is its default)
        parks the row ``unknown_outcome`` instead: a call that hangs every time is not resent
        for ever. Returns the keys released to pending (the parked ones are not).
        """
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(
                    m.c.id,
                    _as_written(m.c.idempotency_key).label("key"),
                    m.c.lease_owner,
                    m.c.unknown_attempts,
                )
                .where(m.c.state == State.INFLIGHT, m.c.lease_expires_at < now)
                .order_by(m.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            released = []
            for row in rows:
                parks = row.unknown_attempts + 1 >= max_unknown_attempts
                if _release(conn, row, now, parks=parks) and not parks:
                    released.append(read_text(row.key, "idempotency_key")[0])
        return released

    @retry_transient
    def expire_due(self, now: datetime, limit: int = 500) -> tuple[int, int]:
        """Pending rows past ``expires_at``: expired, or parked if an attempt may have executed.

        Returns (expired, parked).
        """
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(m.c.id, m.c.maybe_executed)
                .where(m.c.state == _PENDING, m.c.expires_at <= now)
                .order_by(m.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            counts = [0, 0]
            for row in rows:
                unknown = bool(row.maybe_executed)
                values: dict[str, Any] = {"updated_at": now, "next_attempt_at": None}
                if unknown:
                    values |= {
                        "state": State.PARKED,
                        "park_reason": "expired_unknown",
                        "last_message": "expired with unknown outcome: an earlier attempt may "
                        "have executed; check on recrypt.net, then cancel --force or requeue",
                    }
                else:
                    values |= {
                        "state": State.EXPIRED,
                        "lane_behind": False,
                        "last_message": "expired: not sent before expires_at (never executed)",
                    }
                done = conn.execute(
                    m.update().where(m.c.id == row.id, m.c.state == State.PENDING).values(**values)
                )
                if done.rowcount == 1:
                    counts[1 if unknown else 0] += 1
                    decision = HistoryDecision.PARK if unknown else HistoryDecision.EXPIRED
                    _add_history(conn, row.id, now, "expirer", Call(HistoryKind.SYSTEM, decision))
            lane_heads.settle(conn, [row.id for row in rows if not row.maybe_executed])
        return counts[0], counts[1]

    @retry_transient
    def hand_back(self, worker: str, ids: Collection[int], now: datetime) -> int:
        """Rows this worker claimed and never sent go back to pending untouched.

        Only for rows whose call provably never started (the dispatcher knows which): a row
        whose call may have started is never handed back untouched; it stays ``inflight``
        until its answer is recorded or the reaper releases it as an unknown outcome.
        """
        if not ids:
            return 0
        with self._tx() as conn:
            done = conn.execute(
                m.update()
                .where(
                    m.c.id.in_(list(ids)),
                    m.c.state == State.INFLIGHT,
                    m.c.lease_owner == worker,
                )
                .values(
                    state=State.PENDING, lease_owner=None, lease_expires_at=None, updated_at=now
                )
            )
        return done.rowcount

    @retry_transient
    def record_late_answers(self, late: Sequence[Outcome], now: datetime) -> None:
        """Answers for rows this worker lost (its lease ran out before it could record).

        Each goes into the attempt history as ``late_answer``: evidence of what executed. An OK
        for a row that the reaper has released, and nobody holds now, commits it with its
        response (the request executed, once); a row already committed without a response
        (ALREADY_EXISTS) gets this one.
        """
        with self._tx() as conn:
            for outcome in late:
                call = outcome.call or Call(HistoryKind.SYSTEM, HistoryDecision.LATE_ANSWER)
                text = bounded(
                    f"answer arrived after this worker had lost the row: {call.message or ''}"
                )
                line = Call(
                    HistoryKind.CALL, HistoryDecision.LATE_ANSWER, call.code, text, call.duration_ms
                )
                _add_history(conn, outcome.claim.id, now, outcome.claim.worker, line)
                if isinstance(outcome, Committed):
                    _commit_late(conn, outcome, now)

    @retry_transient
    def record_stream_event(self, key: str, event: Call, now: datetime) -> bool:
        """Attach an event from a server stream (an order update) to the row with that key.

        Returns False when no row has the key (an order placed outside the outbox).
        """
        with self._tx() as conn:
            found = conn.execute(sa.select(m.c.id).where(m.c.idempotency_key == key)).first()
            if found is None:
                return False
            _add_history(conn, found.id, now, "stream", event)
        return True

    # ---- operators

    @retry_transient
    def requeue(self, key: str, actor: str, reason: str, now: datetime) -> RowView:
        """parked → pending, same key, due now."""
        with self._tx() as conn:
            row = self._locked_row(conn, key)
            if row.state != State.PARKED:
                raise OperatorActionError(
                    f"row {key} is {row.state}, not parked: only parked rows can be requeued"
                )
            values: dict[str, Any] = {
                "state": State.PENDING,
                "next_attempt_at": None,
                "park_reason": None,
                "last_message": bounded(f"requeued by {actor}: {reason}"),
                "updated_at": now,
            }
            if row.park_reason == "expired_unknown":
                values["expires_at"] = None  # the operator decided to send it after all
            conn.execute(
                m.update().where(m.c.id == row.id, m.c.state == State.PARKED).values(**values)
            )
            _add_history(
                conn,
                row.id,
                now,
                actor,
                Call(HistoryKind.OPERATOR, HistoryDecision.REQUEUE, None, reason),
            )
            if self.dialect == "postgresql":  # wake a listening daemon (as an insert does)
                conn.execute(sa.text("SELECT pg_notify('outbox_messages', '')"))
        return self.get(key)

    @retry_transient
    def cancel(self, key: str, actor: str, reason: str, now: datetime, force: bool) -> RowView:
        """pending/parked → cancelled. Refuses a row that may have executed unless ``force``."""
        with self._tx() as conn:
            row = self._locked_row(conn, key)
            if row.state not in (State.PENDING, State.PARKED):
                raise OperatorActionError(
                    f"row {key} is {row.state}: only pending or parked rows can be cancelled"
                    + (
                        " (wait for the call in flight to finish)"
                        if row.state == "inflight"
                        else ""
                    )
                )
            if row.maybe_executed and not force:
                raise OperatorActionError(
                    f"row {key} may already have executed at Recrypt (maybe_executed): check on "
                    "recrypt.net whether a transaction with this idempotency key happened; if it "
                    "did not, cancel again with --force; if it did, requeue it (it will commit "
                    "on ALREADY_EXISTS)"
                )
            conn.execute(
                m.update()
                .where(m.c.id == row.id, m.c.state == row.state)
                .values(
                    state=State.CANCELLED,
                    lane_behind=False,
                    next_attempt_at=None,
                    last_message=bounded(f"cancelled by {actor}: {reason}"),
                    updated_at=now,
                )
            )
            decision = (
                HistoryDecision.CANCEL_FORCED
                if force and row.maybe_executed
                else HistoryDecision.CANCEL
            )
            _add_history(
                conn, row.id, now, actor, Call(HistoryKind.OPERATOR, decision, None, reason)
            )
            lane_heads.settle(conn, [row.id])
        return self.get(key)

    def _locked_row(self, conn: Connection, key: str) -> Any:
        row = conn.execute(
            sa.select(m.c.id, m.c.state, m.c.maybe_executed, m.c.park_reason)
            .where(m.c.idempotency_key == key)
            .with_for_update()
        ).first()
        if row is None:
            raise RowNotFoundError(f"no outbox row has idempotency_key {key}")
        return row

    # ---- reading

    def get(self, key: str) -> RowView:
        with self.engine.connect() as conn:
            row = conn.execute(
                _view_query(with_payload=True).where(m.c.idempotency_key == key)
            ).first()
        if row is None:
            raise RowNotFoundError(f"no outbox row has idempotency_key {key}")
        return _view(row)

    def history(self, key: str) -> list[HistoryLine]:
        a = attempts
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    a.c.at,
                    a.c.kind,
                    a.c.actor,
                    a.c.code,
                    a.c.message,
                    a.c.decision,
                    a.c.duration_ms,
                )
                .join(m, m.c.id == a.c.message_id)
                .where(m.c.idempotency_key == key)
                .order_by(a.c.id)
            ).all()
        return [HistoryLine(**row._mapping) for row in rows]

    def list_rows(
        self,
        *,
        state: str | None = None,
        method: str | None = None,
        lane: str | None = None,
        limit: int = 50,
    ) -> list[RowView]:
        query = _view_query(with_payload=False).order_by(m.c.id.desc()).limit(limit)
        for column, value in ((m.c.state, state), (m.c.method, method), (m.c.lane, lane)):
            if value is not None:
                query = query.where(column == value)
        with self.engine.connect() as conn:
            return [_view(row) for row in conn.execute(query)]

    def status(self, now: datetime) -> StatusView:
        with self.engine.connect() as conn:
            counts: dict[str, int] = dict(
                conn.execute(sa.select(m.c.state, sa.func.count()).group_by(m.c.state)).all()
            )
            firsts = conn.execute(_oldest_due_query(now)).one()
            oldest = min((t for t in map(_aware, firsts) if isinstance(t, datetime)), default=None)
            parked = {
                reason or "unknown": int(count)
                for reason, count in conn.execute(
                    sa.select(m.c.park_reason, sa.func.count())
                    .where(m.c.state == State.PARKED)
                    .group_by(m.c.park_reason)
                ).all()
            }
            lanes = [
                read_text(lane, "lane")[0]
                for lane in conn.execute(
                    sa.select(_as_written(m.c.lane))
                    .where(m.c.state == State.PARKED, m.c.lane.is_not(None))
                    .distinct()
                ).scalars()
            ]
            expired, oldest_expiry = self._expired_leases(conn, now)
            maybe = conn.execute(
                sa.select(sa.func.count()).where(
                    m.c.maybe_executed.is_(True), m.c.state.in_([s.value for s in OPEN_STATES])
                )
            ).scalar_one()
        return StatusView(
            counts={s.value: int(counts.get(s.value, 0)) for s in State},
            oldest_due_at=oldest,
            parked_by_reason={str(k): int(v) for k, v in parked.items()},
            blocked_lanes=sorted(lanes),
            maybe_executed_open=int(maybe),
            workers=self.list_workers(),
            leases_expired=expired,
            oldest_lease_expired_at=oldest_expiry,
        )

    @staticmethod
    def _expired_leases(conn: Connection, now: datetime) -> tuple[int, datetime | None]:
        """Rows in flight whose lease ran out before ``now``, and the earliest lease end."""
        count, oldest = conn.execute(_expired_leases_query(now)).one()
        return int(count), _aware(oldest)

    def explain_expired_leases(self, now: datetime) -> str:
        """The database's plan for the expired-lease count (``status``, the gauges)."""
        return self._explain(self._written(_expired_leases_query(now)), analyze=False)

    # ---- workers and retention

    def database_now(self) -> datetime:
        """The database server's clock (UTC): the one clock every daemon shares."""
        now: Any = {
            "sqlite": sa.func.strftime("%Y-%m-%d %H:%M:%f", "now"),
            "postgresql": sa.func.statement_timestamp(),
        }.get(self.dialect, sa.func.utc_timestamp(6))
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(now)).scalar_one()
        return _aware(value)  # type: ignore[no-any-return]

    @retry_transient
    def heartbeat(self, beat: WorkerBeat, now: datetime) -> None:
        values = {
            "host": beat.host,
            "pid": beat.pid,
            "version": beat.version,
            "started_at": beat.started_at,
            "last_beat_at": now,
            "gate": beat.gate,
            "gate_reason": beat.gate_reason,
            "failing_jobs": failures_json(beat.failing_jobs),
            "gate_until": beat.gate_until,
            "gate_since": beat.gate_since,
            "refused_methods": ",".join(beat.refused_methods) or None,
            "stopped_at": None,
        }
        with self._tx() as conn:
            done = conn.execute(
                workers.update().where(workers.c.worker_id == beat.worker_id).values(**values)
            )
            if done.rowcount == 0:
                conn.execute(workers.insert().values(worker_id=beat.worker_id, **values))

    @retry_transient
    def worker_stopped(self, worker_id: str, now: datetime) -> None:
        with self._tx() as conn:
            conn.execute(
                workers.update()
                .where(workers.c.worker_id == worker_id)
                .values(stopped_at=now, last_beat_at=now, gate="stopped")
            )

    @retry_transient
    def purge_workers(self, silent_since: datetime) -> int:
        """Delete workers whose last beat (or stop) is older than ``silent_since``: stopped
        long ago, or dead without a stop. Live workers beat every few seconds."""
        with self._tx() as conn:
            done = conn.execute(workers.delete().where(workers.c.last_beat_at < silent_since))
        return int(done.rowcount)

    def list_workers(self) -> list[WorkerView]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(workers).order_by(workers.c.started_at)).all()
        return [_worker(row) for row in rows]

    def retrying(self, due_before: datetime, attempts: int) -> RetryingView:
        """Pending rows Recrypt has answered that first became due before ``due_before``, and
        pending rows with at least ``attempts`` attempts: counts, the oldest, the commonest
        last answer. One query, over the pending rows' index only (``outbox check``)."""
        with self.engine.connect() as conn:
            groups = conn.execute(_retrying_query(due_before, attempts)).all()
        return _retrying_view(groups)

    def explain_retrying(self, due_before: datetime, attempts: int) -> str:
        """The database's plan for ``retrying`` (all three databases), for tests and ops."""
        return self._explain(self._written(_retrying_query(due_before, attempts)), analyze=False)

    @retry_transient
    def purge_finished(
        self, older_than: datetime, batch: int, *, now: datetime | None = None
    ) -> int:
        """Delete one batch of finished rows (and their history) last updated before a time.

        Each purged key leaves a tombstone in the same transaction: Recrypt may remember the
        key long after the row is gone, and a new request under it would "commit" on
        ALREADY_EXISTS without its effect. ``purge_tombstones`` removes them much later.
        """
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(
                    m.c.id,
                    _as_written(m.c.idempotency_key).label("key"),
                    m.c.payload_fingerprint,
                    m.c.state,
                    m.c.updated_at,
                )
                .where(
                    m.c.state.in_([s.value for s in FINISHED_STATES]),
                    m.c.updated_at < older_than,
                )
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

    @retry_transient
    def purge_tombstones(self, older_than: datetime, batch: int) -> int:
        """Delete one batch of tombstones of keys purged before a time ([retention]
        tombstone_days ago): from then on, such a key would be accepted again.
        """
        t = tombstones
        with self._tx() as conn:
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

    def claim_sql(self, batch: int, now: datetime) -> str:
        """The claim's row selection as this database runs it, values written in."""
        return self._written(self._due_query(batch, now, ()).with_only_columns(m.c.id))

    def oldest_due_sql(self, now: datetime) -> str:
        """The "oldest due" gauge's query (``status``), values written in."""
        return self._written(_oldest_due_query(now))

    def explain_claim(self, batch: int, now: datetime, *, analyze: bool = False) -> str:
        """The database's plan for the claim's row selection, for tests and ops.

        ``analyze`` runs it (in a transaction rolled back): PostgreSQL ``EXPLAIN (ANALYZE,
        BUFFERS)``, MariaDB ``ANALYZE FORMAT=JSON``; SQLite gives ``EXPLAIN QUERY PLAN``.
        """
        return self._explain(self.claim_sql(batch, now), analyze=analyze)

    def explain_oldest_due(self, now: datetime, *, analyze: bool = False) -> str:
        """The database's plan for the "oldest due" gauge (as ``explain_claim``)."""
        return self._explain(self.oldest_due_sql(now), analyze=analyze)

    def _written(self, query: sa.Select[Any] | sa.Select[int, Any]) -> str:
        """``query`` as this database runs it, its values written in (for EXPLAIN)."""
        return str(query.compile(self.engine, compile_kwargs={"literal_binds": True}))

    def _explain(self, sql: str, *, analyze: bool) -> str:
        explain = {
            "sqlite": "EXPLAIN QUERY PLAN",
            "postgresql": "EXPLAIN (ANALYZE, BUFFERS)" if analyze else "EXPLAIN",
        }.get(self.dialect, "ANALYZE FORMAT=JSON" if analyze else "EXPLAIN")
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(f"{explain} {sql}").all()
            conn.rollback()
        return "\n".join(" ".join(str(part) for part in row) for row in rows)

    # ---- the console's reading (outbox.store.console_views)

    def find_rows(self, wanted: views.RowFilter, limit: int = 50) -> views.RowPage:
        """One page of rows matching ``wanted``, by keyset (the console's Rows page)."""
        query = views.find_rows_query(_view_query(with_payload=False), wanted, limit)
        with self.engine.connect() as conn:
            return views.page_of([_view(row) for row in conn.execute(query)], limit)

    def activity(self, start: datetime, minutes: int) -> views.Activity:
        """Committed / parked / retried history lines per minute since ``start``."""
        with self.engine.connect() as conn:
            return views.activity(conn, start, minutes)

    def blocked_lanes(self, limit: int = 100) -> list[views.BlockedLane]:
        """Each lane held by a parked row: that row, and how many rows wait behind it."""
        with self.engine.connect() as conn:
            heads = views.blocked_lane_heads(conn, limit)
            found = conn.execute(
                _view_query(with_payload=False).where(m.c.id.in_([h for _, h, _ in heads]))
            ).all()
        rows = {row.id: row for row in map(_view, found)}
        return [views.BlockedLane(str(lane), rows[head], n) for lane, head, n in heads]


# --------------------------------------------------------------------------- helpers


class _as_written(sa.sql.expression.FunctionElement[Any]):
    """A writer's text column as the database holds it, converted to text in Python.

    SQLite stores any bytes in a text column, and its driver fails the whole fetch (quoting
    the value) on one that is not UTF-8; so SQLite hands over the bytes (``CAST … AS BLOB``)
    and ``read_text`` decodes them row by row. The other databases refuse such values at
    INSERT and hand over text.
    """

    type = sa.types.NullType()
    inherit_cache = True
    name = "as_written"


@compiles(_as_written)
def _as_written_text(element: _as_written, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(_as_written, "sqlite")
def _as_written_blob(element: _as_written, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS BLOB)"


#: The writers' text columns a claim reads, in Claim's field names.
_WRITER_TEXT = ("idempotency_key", "method", "payload", "lane")


def _claim_columns() -> tuple[Any, ...]:
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
        _as_written(m.c.idempotency_key).label("idempotency_key"),
        _as_written(m.c.method).label("method"),
        _as_written(sa.cast(m.c.payload, sa.Text)).label("payload"),
        _as_written(m.c.lane).label("lane"),
        m.c.attempts,
        m.c.unknown_attempts,
        m.c.maybe_executed,
        m.c.payload_fingerprint,
        spent.label("key_purged_at"),
    )


def _writer_text_of(row: sa.Row[Any]) -> tuple[dict[str, Any], str | None]:
    """The writers' columns of a claimed row as text, and the first defect found, if any."""
    text: dict[str, Any] = {}
    defects = []
    for column in _WRITER_TEXT:
        text[column], defect = read_text(getattr(row, column), column)
        defects.append(defect)
    return text, next((d for d in defects if d), None)


def _commit_late(conn: Connection, outcome: Committed, now: datetime) -> None:
    """A late OK: commit a released row nobody holds, or fill in a missing response."""
    response = sa.bindparam("b_response", type_=m.c.response.type)
    row = m.c.id == outcome.claim.id
    conn.execute(
        m.update()
        .where(row, m.c.state == State.PENDING)
        .values(
            state=State.COMMITTED,
            committed_at=now,
            response=response,
            next_attempt_at=None,
            last_code=outcome.call.code,
            last_message=bounded(outcome.call.message or ""),
            updated_at=now,
        ),
        {"b_response": outcome.response},
    )
    lane_heads.settle(conn, [outcome.claim.id])
    if outcome.response is not None:
        no_response = sa.or_(m.c.response.is_(None), sa.cast(m.c.response, sa.Text) == "null")
        conn.execute(  # in flight with another worker (it will get ALREADY_EXISTS), or done
            m.update()
            .where(row, m.c.state.in_([State.INFLIGHT, State.COMMITTED]), no_response)
            .values(response=response),
            {"b_response": outcome.response},
        )


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


def _release(conn: Connection, row: Any, now: datetime, *, parks: bool) -> bool:
    """One expired lease: back to pending, or parked ``unknown_outcome``. False: the row moved."""
    owner, unknown = row.lease_owner, row.unknown_attempts + 1
    if parks:
        text = (
            f"lease of worker {owner} expired mid-call; outcome unknown for {unknown} attempts: "
            "check on recrypt.net whether the transaction with this idempotency key happened, "
            "then requeue (same key, safe) or cancel --force"
        )
        values: dict[str, Any] = {"state": State.PARKED, "park_reason": "unknown_outcome"}
        line = Call(HistoryKind.SYSTEM, HistoryDecision.PARK, "LEASE_EXPIRED", text)
    else:
        text = f"lease of worker {owner} expired mid-call: resending with the same key (safe)"
        values = {"state": State.PENDING}
        line = Call(
            HistoryKind.SYSTEM, HistoryDecision.LEASE_EXPIRED, "LEASE_EXPIRED", f"worker {owner}"
        )
    done = conn.execute(
        m.update()
        .where(m.c.id == row.id, m.c.state == State.INFLIGHT, m.c.lease_owner == owner)
        .values(
            **values,
            attempts=m.c.attempts + 1,
            unknown_attempts=m.c.unknown_attempts + 1,
            maybe_executed=True,
            lease_owner=None,
            lease_expires_at=None,
            next_attempt_at=None,
            last_code="LEASE_EXPIRED",
            last_message=bounded(text),
            updated_at=now,
        )
    )
    if done.rowcount == 1:
        _add_history(conn, row.id, now, "reaper", line)
    return bool(done.rowcount == 1)


#: MariaDB/MySQL server errors that pymysql raises as OperationalError although they refuse a
#: row's data, not the connection: a CHECK constraint failed (3819 MySQL, 4025 MariaDB).
_REFUSED_DATA_CODES = {3819, 4025}


def _connection_level(exc: sa.exc.StatementError) -> bool:
    """Not the row's fault: no connection, a dropped one, a server that stopped answering."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return False  # a value that could not even be bound: the row's data
    if exc.connection_invalidated or isinstance(exc, sa.exc.InterfaceError):
        return True
    code = (getattr(exc.orig, "args", None) or (None,))[0]
    return isinstance(exc, sa.exc.OperationalError) and code not in _REFUSED_DATA_CODES


def _error_name(exc: sa.exc.StatementError) -> str:
    """The error's class and code, never its text (which may quote the refused value)."""
    orig = exc.orig if exc.orig is not None else exc
    code = getattr(orig, "sqlstate", None) or (getattr(orig, "args", None) or (None,))[0]
    return type(orig).__name__ + (f" {code}" if isinstance(code, (int, str)) else "")


def _refused(outcome: Outcome, error: str) -> Parked:
    """An outcome the database refused to store, as a park that stores nothing of it but its
    answer's code, cut short, in a fixed message (the code may be what was refused).
    """
    code = bounded(outcome.call.code, 32) if outcome.call else None
    maybe = isinstance(outcome, (Retry, Parked)) and outcome.maybe_executed
    if isinstance(outcome, Committed):
        then = "it executed once: requeue it (same key) to commit on ALREADY_EXISTS"
    elif maybe:
        then = "it may have executed: check on recrypt.net, then requeue (same key) or cancel"
    else:
        then = "nothing executed: requeue it (same key) or cancel it"
    text = (
        f"the database refused to store this row's outcome ({error}); Recrypt answered "
        f"{code or 'nothing'}: {then}"
    )
    return Parked(
        outcome.claim,
        Call(HistoryKind.SYSTEM, HistoryDecision.PARK, None, text),
        reason="bad_row",  # policy.ParkReason.BAD_ROW (the store does not import the policy)
        maybe_executed=isinstance(outcome, Committed) or maybe,
        counts_attempt=isinstance(outcome, Committed)
        or (isinstance(outcome, (Retry, Parked)) and outcome.counts_attempt),
    )


def _lane_free() -> sa.ColumnElement[bool]:
    """A lane's row is claimable when no row of its lane is in flight and no earlier one is open.

    "No earlier row open" alone is not enough: a writer that commits late makes a row with a
    smaller id appear after a later row of its lane was claimed; without the first condition
    both would be in flight at once, the late one overtaking. Both probes are index lookups
    (``uq_outbox_messages_inflight_lane``, ``ix_outbox_messages_lane_open``). A concurrent
    claim that neither probe can see yet is stopped by the unique index (``_transient``).
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


def _finishes_a_lane_row(outcome: Outcome) -> bool:
    """A committed row of a lane: its lane's next row may become a candidate."""
    return isinstance(outcome, Committed) and outcome.claim.lane is not None


def _claim_token(claim: Claim) -> tuple[int, str, int]:
    """What identifies one claim: the row, the worker, and the attempts when it was claimed.

    The reaper counts an attempt when it releases a row, so a worker that claims the same row
    again holds a new token, and its outcome for the old claim is reported lost.
    """
    return (claim.id, claim.worker, claim.attempts)


def _guarded(**values: Any) -> sa.Update:
    """``UPDATE … WHERE id AND state = 'inflight' AND lease_owner AND attempts`` (the claim)."""
    released = {
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": sa.bindparam("b_now", type_=UTCDateTime()),
        "last_code": sa.bindparam("b_code", type_=sa.String()),
        "last_message": sa.bindparam("b_message", type_=sa.Text()),
    }
    return (
        m.update()
        .where(
            m.c.id == sa.bindparam("b_id"),
            m.c.state == State.INFLIGHT,
            m.c.lease_owner == sa.bindparam("b_owner"),
            m.c.attempts == sa.bindparam("b_attempts"),  # this claim, not a later one
        )
        .values(**released, **values)
    )


_ACTOR_LIMIT = attempts.c.actor.type.length or 255  # type: ignore[attr-defined]
_counted = m.c.attempts + sa.bindparam("b_counted", type_=sa.Integer())
#: Once a row may have executed it stays so: the flag is only ever set, never cleared.
_sticky_maybe = sa.or_(m.c.maybe_executed, sa.bindparam("b_maybe", type_=sa.Boolean()))
#: One statement per kind of outcome, compiled once, run with executemany.
_TRANSITIONS: dict[type, sa.Update] = {
    Committed: _guarded(
        state=State.COMMITTED,
        committed_at=sa.bindparam("b_now", type_=UTCDateTime()),
        # an ALREADY_EXISTS has no response: keep one a late OK may have left (its evidence)
        response=sa.func.coalesce(
            sa.bindparam("b_response", type_=m.c.response.type), m.c.response
        ),
        attempts=m.c.attempts + 1,
        next_attempt_at=None,
    ),
    Retry: _guarded(
        state=State.PENDING,
        next_attempt_at=sa.bindparam("b_at", type_=UTCDateTime()),
        attempts=_counted,
        unknown_attempts=m.c.unknown_attempts + sa.bindparam("b_unknown", type_=sa.Integer()),
        maybe_executed=_sticky_maybe,
    ),
    Parked: _guarded(
        state=State.PARKED,
        park_reason=sa.bindparam("b_reason", type_=sa.String()),
        next_attempt_at=None,
        attempts=_counted,
        maybe_executed=_sticky_maybe,
    ),
    HandedBack: _guarded(
        state=State.PENDING, next_attempt_at=sa.bindparam("b_at", type_=UTCDateTime())
    ),
}


def _transition_params(outcome: Outcome, now: datetime) -> dict[str, Any]:
    call = outcome.call
    params: dict[str, Any] = {
        "b_id": outcome.claim.id,
        "b_owner": outcome.claim.worker,
        "b_attempts": outcome.claim.attempts,
        "b_now": now,
        "b_code": call.code if call else None,
        "b_message": bounded(call.message) if call else None,
    }
    match outcome:
        case Committed():
            params["b_response"] = outcome.response
        case Retry():
            counted, maybe = outcome.counts_attempt, outcome.maybe_executed
            params |= {
                "b_at": outcome.at,
                "b_counted": int(counted),
                "b_maybe": maybe,
                "b_unknown": int(outcome.unknown_outcome),
            }
        case Parked():
            counted, maybe = outcome.counts_attempt, outcome.maybe_executed
            params |= {"b_reason": outcome.reason, "b_counted": int(counted), "b_maybe": maybe}
        case HandedBack():
            params["b_at"] = outcome.at
    return params


def _history_params(message_id: int, now: datetime, actor: str, call: Call) -> dict[str, Any]:
    """One history line; every history line is written through here, its text bounded."""
    return {
        "message_id": message_id,
        "at": now,
        "kind": call.kind,
        "actor": bounded(actor, _ACTOR_LIMIT),
        "code": call.code,
        "message": bounded(call.message),
        "decision": call.decision,
        "duration_ms": call.duration_ms,
    }


def _add_history(conn: Connection, message_id: int, now: datetime, actor: str, call: Call) -> None:
    conn.execute(attempts.insert().values(**_history_params(message_id, now, actor, call)))


_Token = tuple[int, str, int]


def _record_rows(conn: Connection, outcomes: Sequence[Outcome], now: datetime) -> set[_Token]:
    """MariaDB, SQLite: lock the rows still held, one executemany per kind of outcome, then
    one INSERT of their history lines."""
    held = _still_held(conn, outcomes)
    kept = [o for o in outcomes if _claim_token(o.claim) in held]
    for kind, statement in _TRANSITIONS.items():
        params = [_transition_params(o, now) for o in kept if type(o) is kind]
        if params:
            conn.execute(statement, params)
    lines = [_history_params(o.claim.id, now, o.claim.worker, o.call) for o in kept if o.call]
    if lines:
        conn.execute(attempts.insert(), lines)
    return held


def _still_held(conn: Connection, outcomes: Sequence[Outcome]) -> set[_Token]:
    rows = conn.execute(
        sa.select(m.c.id, m.c.lease_owner, m.c.attempts)
        .where(m.c.id.in_([o.claim.id for o in outcomes]), m.c.state == State.INFLIGHT)
        .with_for_update()
    ).all()
    return {(row.id, row.lease_owner, row.attempts) for row in rows}


def _record_json(conn: Connection, outcomes: Sequence[Outcome], now: datetime) -> set[_Token]:
    """PostgreSQL: one statement per kind of outcome for the whole batch, its rows passed as
    one JSON document: the guarded UPDATE of every row, the history lines of the rows it
    changed, and their tokens (exactly the rows this worker still held: the guard is the
    claim's token)."""
    held: set[_Token] = set()
    for kind, statement in _BATCHED_TRANSITIONS.items():
        rows = [_batched_params(o, now) for o in outcomes if type(o) is kind]
        if rows:
            found = conn.execute(statement, {"b_now": now, "b_rows": _json_rows(rows)})
            held.update((r.b_id, r.b_owner, r.b_attempts) for r in found)
    return held


def _batched_params(outcome: Outcome, now: datetime) -> dict[str, Any]:
    """One row of a batched transition: its transition's parameters and its history line's."""
    params = _transition_params(outcome, now)
    del params["b_now"]  # bound once per batch
    call = outcome.call
    if call is not None:
        line = _history_params(outcome.claim.id, now, outcome.claim.worker, call)
        params |= {f"h_{name}": line[name] for name in _LINE_FIELDS}
    return params


def _json_rows(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps(rows, default=_json_time, separators=(",", ":"))


def _json_time(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} in a batched transition")


#: The history line's own fields in a batched row (its row, time and text come from the
#: transition: ``b_id``, ``b_now``, ``b_code``, ``b_message``, which hold the same values).
_LINE_FIELDS = ("kind", "actor", "decision", "duration_ms")
_NO_OPTIONS: dict[str, Any] = {}


def _batched(statement: sa.Update) -> sa.Select[Any]:
    """``statement`` (one row's guarded transition) for a whole batch on PostgreSQL.

    Each per-row parameter ``b_*`` becomes a column of ``jsonb_to_recordset`` over one JSON
    document; the UPDATE joins the table to it; the history lines of the rows it changed are
    inserted in the same statement; it returns the tokens of those rows.
    """
    binds = {
        b.key: b
        for b in visitors.iterate(statement)
        if isinstance(b, BindParameter) and b.key.startswith("b_") and b.key != "b_now"
    }
    columns = [sa.column(k, b.type) for k, b in binds.items()]
    columns += [sa.column(f"h_{n}", attempts.c[n].type) for n in _LINE_FIELDS]
    document = sa.cast(sa.bindparam("b_rows", type_=sa.Text()), postgresql.JSONB)
    rows = (
        sa.func.jsonb_to_recordset(document)
        .table_valued(*columns)
        .render_derived(name="v", with_types=True)
    )

    def column(element: Any, **_kw: Any) -> Any:
        if isinstance(element, BindParameter) and element.key in binds:
            return rows.c[element.key]
        return None

    update = cast(sa.Update, visitors.replacement_traverse(statement, _NO_OPTIONS, column))
    kept = (
        "b_id",
        "b_owner",
        "b_attempts",
        "b_code",
        "b_message",
        *(f"h_{n}" for n in _LINE_FIELDS),
    )
    done = update.returning(*(rows.c[k] for k in kept)).cte("done")
    line = {
        "message_id": done.c.b_id,
        "at": sa.bindparam("b_now", type_=UTCDateTime()),
        "code": done.c.b_code,
        "message": done.c.b_message,
    } | {n: done.c[f"h_{n}"] for n in _LINE_FIELDS}
    lines = attempts.insert().from_select(
        list(line), sa.select(*line.values()).where(done.c.h_kind.is_not(None))
    )
    return sa.select(done.c.b_id, done.c.b_owner, done.c.b_attempts).add_cte(lines.cte("lines"))


#: ``_TRANSITIONS`` for a whole batch, one statement each (PostgreSQL).
_BATCHED_TRANSITIONS = {kind: _batched(st) for kind, st in _TRANSITIONS.items()}


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
_VIEW_WRITER_TEXT = frozenset({"idempotency_key", "method", "lane", "reference", "payload"})


def _view_query(*, with_payload: bool) -> sa.Select[Any]:
    columns: list[Any] = [
        _as_written(m.c[name]).label(name) if name in _VIEW_WRITER_TEXT else m.c[name]
        for name in _VIEW_COLUMNS
    ]
    if with_payload:
        columns += [
            _as_written(sa.cast(m.c.payload, sa.Text)).label("payload"),
            sa.cast(m.c.response, sa.Text).label("response"),
        ]
    return sa.select(*columns)


#: The view's timestamp columns: only these are read as times (a reference may look like one).
_VIEW_TIMES = frozenset(c.name for c in m.c if isinstance(c.type, UTCDateTime))


def _view(row: sa.Row[Any]) -> RowView:
    """A row for operators; never fails on what a column holds (``outbox show`` must work)."""
    data = {k: _aware(v) if k in _VIEW_TIMES else v for k, v in row._mapping.items()}
    for name in _VIEW_WRITER_TEXT & data.keys():
        data[name] = read_text(data[name], name)[0]  # bytes that are not UTF-8: a placeholder
    data["maybe_executed"] = bool(data["maybe_executed"])
    return RowView(**data)


def _aware(value: Any) -> Any:
    """A time as aware UTC; a stored value that is not a time is returned as text, as stored.

    Aggregates (min) bypass the column type on some drivers, so times may arrive as naive
    datetimes or as text. A value that is no time at all (an SQLite row written before
    migration 0005, MariaDB's zero date) is shown as it is rather than crash the caller.
    """
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        return UTCDateTime().process_result_value(value, None)  # type: ignore[arg-type]
    return value if value is None else str(value)


def _oldest_due_query(now: datetime) -> sa.Select[Any]:
    """When the oldest due row became due, as two index reads on ``ix_outbox_messages_due``
    (the gauge runs every 15 s: it never scans). Rows due from insertion (``DUE_NOW``): the
    insertion of the first in id order. Rows with a time: the first in ``due_at`` order, as
    its retry time, else the later of ``not_before`` and its insertion."""
    first_due_now = (
        sa.select(m.c.created_at)
        .where(m.c.due_at == _DUE_NOW)  # only a candidate has a due_at
        .order_by(m.c.due_at, m.c.id)
        .limit(1)
    )
    first_timed = (
        sa.select(sa.func.coalesce(m.c.next_attempt_at, _first_due()))
        .where(
            m.c.due_at > _DUE_NOW,
            m.c.due_at <= now,
        )
        .order_by(m.c.due_at, m.c.id)
        .limit(1)
    )
    return sa.select(
        first_due_now.scalar_subquery().label("due_now"),
        first_timed.scalar_subquery().label("timed"),
    )


def _expired_leases_query(now: datetime) -> sa.Select[int, Any]:
    """Over ``ix_outbox_messages_lease`` only (partial on in-flight rows where it can be)."""
    return sa.select(sa.func.count(), sa.func.min(m.c.lease_expires_at)).where(
        m.c.state == _INFLIGHT, m.c.lease_expires_at < now
    )


def _first_due() -> sa.ColumnElement[Any]:
    """When a row first became due: the later of its insertion and ``not_before``."""
    return sa.case((m.c.not_before > m.c.created_at, m.c.not_before), else_=m.c.created_at)


def _worker(row: sa.Row[Any]) -> WorkerView:
    data = {k: _aware(v) if isinstance(v, datetime) else v for k, v in row._mapping.items()}
    data["refused_methods"] = tuple(p for p in (data["refused_methods"] or "").split(",") if p)
    data["failing_jobs"] = failures_from_json(data["failing_jobs"])
    return WorkerView(**data)


#: Claim statements kept per store (one per set of methods the gates exclude).
_CLAIMS_KEPT = 16
_DUE_NOW = datetime.fromisoformat(DUE_NOW).replace(tzinfo=UTC)
RETRYING_MESSAGE_CUT = 200  # characters of a last message ``retrying`` reads, at most
#: Written out, not bound: PostgreSQL's generic plan for a bound state cannot use the
#: partial index on pending rows (``ix_outbox_messages_due``).
_PENDING: sa.ColumnElement[str] = sa.literal_column(f"'{State.PENDING.value}'", sa.String())
_INFLIGHT: sa.ColumnElement[str] = sa.literal_column(f"'{State.INFLIGHT.value}'", sa.String())


def _retrying_query(due_before: datetime, attempts: int) -> sa.Select[Any]:
    """Per last_code: pending rows answered and first due before ``due_before`` (long), or
    with at least ``attempts`` attempts (many). A rate-limit answer hands a row back without
    counting an attempt, so "answered" is an attempt counted or a last code."""
    answered = sa.or_(m.c.attempts > 0, m.c.last_code.is_not(None))
    cutoff = sa.bindparam("due_before", due_before, type_=UTCDateTime())
    long = sa.and_(answered, _first_due() <= cutoff)
    many = m.c.attempts >= sa.bindparam("attempts", attempts, type_=sa.Integer())
    return (
        sa.select(
            m.c.last_code,
            sa.func.count().label("rows"),
            sa.func.sum(sa.case((long, 1), else_=0)).label("long"),
            sa.func.min(sa.case((long, _first_due()))).label("first_due"),
            sa.func.sum(sa.case((many, 1), else_=0)).label("many"),
            sa.func.max(sa.case((many, m.c.attempts))).label("most"),
            sa.func.min(sa.func.substr(m.c.last_message, 1, RETRYING_MESSAGE_CUT)).label("message"),
        )
        .where(m.c.state == _PENDING, sa.or_(long, many))
        .group_by(m.c.last_code)
    )


def _retrying_view(groups: Sequence[sa.Row[Any]]) -> RetryingView:
    if not groups:
        return RetryingView()
    top = min(groups, key=lambda g: (-int(g.rows), g.last_code is None, g.last_code or ""))
    firsts = [t for g in groups if isinstance(t := _aware(g.first_due), datetime)]
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


def new_key() -> str:
    return str(uuid.uuid4())
