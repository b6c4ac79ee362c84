"""Recording (the dispatcher's): outcomes of claimed rows, leases renewed, rows handed back,
answers that came too late, events from a server stream.

Every transition of a claimed row is guarded by its claim (``outbox.store.transitions``): a
worker that lost the row changes nothing and is told so. Imports SQLAlchemy,
``outbox.schema``, ``outbox.payload`` and the store's own modules only.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from outbox.payload import bounded
from outbox.schema import State, messages
from outbox.store import heads as lane_heads
from outbox.store.history import add_history, add_lines, history_params
from outbox.store.rows import Committed, HistoryLine, Outcome, Parked, Retry
from outbox.store.transitions import (
    BATCHED_TRANSITIONS,
    TRANSITIONS,
    Token,
    batched_params,
    claim_token,
    json_rows,
    transition_params,
)
from outbox.store.tx import connection_level, error_name, write
from outbox.vocabulary import HistoryDecision, HistoryKind

log = logging.getLogger("outbox.store")
m = messages


def record(engine: Engine, outcomes: Sequence[Outcome], now: datetime) -> list[Outcome]:
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
        return write(engine, record_batch, outcomes, now)
    except sa.exc.StatementError as exc:
        if connection_level(exc):
            raise
    return [lost for outcome in outcomes for lost in _record_alone(engine, outcome, now)]


def _record_alone(engine: Engine, outcome: Outcome, now: datetime) -> list[Outcome]:
    """One outcome in its own transaction; if its data is refused, a fixed-message park."""
    try:
        return write(engine, record_batch, [outcome], now)
    except sa.exc.StatementError as exc:
        if connection_level(exc):
            raise
        error = error_name(exc)
    log.error("event=record_refused row=%s error=%s then=park_bad_row", outcome.claim.id, error)
    return [outcome] if write(engine, record_batch, [_refused(outcome, error)], now) else []


def record_batch(conn: Connection, outcomes: Sequence[Outcome], now: datetime) -> list[Outcome]:
    """One transaction: the guarded transitions of the rows this worker still holds (the
    others were taken over after our lease ran out, and their newer outcome stands) and
    their history lines. PostgreSQL: one statement per kind of outcome for the batch;
    the others: one locking SELECT, one UPDATE per kind of outcome with a parameter set
    per row (executemany), and one INSERT of history lines.
    """
    if conn.dialect.name == "postgresql":
        held = _record_json(conn, outcomes, now)
    else:
        held = _record_rows(conn, outcomes, now)
    finished = [o for o in outcomes if _finishes_a_lane_row(o)]
    lane_heads.settle(conn, [o.claim.id for o in finished if claim_token(o.claim) in held])
    return [o for o in outcomes if claim_token(o.claim) not in held]


def _record_rows(conn: Connection, outcomes: Sequence[Outcome], now: datetime) -> set[Token]:
    """MariaDB, SQLite: lock the rows still held, one executemany per kind of outcome, then
    one INSERT of their history lines."""
    held = _still_held(conn, outcomes)
    kept = [o for o in outcomes if claim_token(o.claim) in held]
    for kind, statement in TRANSITIONS.items():
        params = [transition_params(o, now) for o in kept if type(o) is kind]
        if params:
            conn.execute(statement, params)
    add_lines(
        conn, [history_params(o.claim.id, now, o.claim.worker, o.line) for o in kept if o.line]
    )
    return held


def _still_held(conn: Connection, outcomes: Sequence[Outcome]) -> set[Token]:
    rows = conn.execute(
        sa.select(m.c.id, m.c.lease_owner, m.c.attempts)
        .where(m.c.id.in_([o.claim.id for o in outcomes]), m.c.state == State.INFLIGHT)
        .with_for_update()
    ).all()
    return {(row.id, row.lease_owner, row.attempts) for row in rows}


def _record_json(conn: Connection, outcomes: Sequence[Outcome], now: datetime) -> set[Token]:
    """PostgreSQL: one statement per kind of outcome for the whole batch, its rows passed as
    one JSON document: the guarded UPDATE of every row, the history lines of the rows it
    changed, and their tokens (exactly the rows this worker still held: the guard is the
    claim's token)."""
    held: set[Token] = set()
    for kind, statement in BATCHED_TRANSITIONS.items():
        rows = [batched_params(o, now) for o in outcomes if type(o) is kind]
        if rows:
            found = conn.execute(statement, {"b_now": now, "b_rows": json_rows(rows)})
            held.update((r.b_id, r.b_owner, r.b_attempts) for r in found)
    return held


def _finishes_a_lane_row(outcome: Outcome) -> bool:
    """A committed row of a lane: its lane's next row may become a candidate."""
    return isinstance(outcome, Committed) and outcome.claim.lane is not None


def _refused(outcome: Outcome, error: str) -> Parked:
    """An outcome the database refused to store, as a park that stores nothing of it but its
    answer's code, cut short, in a fixed message (the code may be what was refused).
    """
    code = bounded(outcome.line.code, 32) if outcome.line else None
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
        HistoryLine(HistoryKind.SYSTEM, HistoryDecision.PARK, None, text),
        reason="bad_row",  # policy.ParkReason.BAD_ROW (the store does not import the policy)
        maybe_executed=isinstance(outcome, Committed) or maybe,
        counts_attempt=isinstance(outcome, Committed)
        or (isinstance(outcome, (Retry, Parked)) and outcome.counts_attempt),
    )


def renew_leases(
    conn: Connection, worker: str, ids: Collection[int], lease: float, now: datetime
) -> int:
    """Extend the lease of rows this worker still holds (long calls)."""
    done = conn.execute(
        m.update()
        .where(m.c.id.in_(list(ids)), m.c.state == State.INFLIGHT, m.c.lease_owner == worker)
        .values(lease_expires_at=now + timedelta(seconds=lease))
    )
    return done.rowcount


def hand_back(conn: Connection, worker: str, ids: Collection[int], now: datetime) -> int:
    """Rows this worker claimed and never sent go back to pending untouched.

    Only for rows whose call provably never started (the dispatcher knows which): a row
    whose call may have started is never handed back untouched; it stays ``inflight``
    until its answer is recorded or the reaper releases it as an unknown outcome.
    """
    done = conn.execute(
        m.update()
        .where(m.c.id.in_(list(ids)), m.c.state == State.INFLIGHT, m.c.lease_owner == worker)
        .values(state=State.PENDING, lease_owner=None, lease_expires_at=None, updated_at=now)
    )
    return done.rowcount


def record_late_answers(conn: Connection, late: Sequence[Outcome], now: datetime) -> None:
    """Answers for rows this worker lost (its lease ran out before it could record).

    Each goes into the attempt history as ``late_answer``: evidence of what executed. An OK
    for a row that the reaper has released, and nobody holds now, commits it with its
    response (the request executed, once); a row already committed without a response
    (ALREADY_EXISTS) gets this one.
    """
    for outcome in late:
        call = outcome.line or HistoryLine(HistoryKind.SYSTEM, HistoryDecision.LATE_ANSWER)
        text = bounded(f"answer arrived after this worker had lost the row: {call.message or ''}")
        line = HistoryLine(
            HistoryKind.CALL, HistoryDecision.LATE_ANSWER, call.code, text, call.duration_ms
        )
        add_history(conn, outcome.claim.id, now, outcome.claim.worker, line)
        if isinstance(outcome, Committed):
            _commit_late(conn, outcome, now)


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
            last_code=outcome.line.code,
            last_message=bounded(outcome.line.message or ""),
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


def record_stream_event(conn: Connection, key: str, event: HistoryLine, now: datetime) -> bool:
    """Attach an event from a server stream (an order update) to the row with that key.

    Returns False when no row has the key (an order placed outside the outbox).
    """
    found = conn.execute(sa.select(m.c.id).where(m.c.idempotency_key == key)).first()
    if found is None:
        return False
    add_history(conn, found.id, now, "stream", event)
    return True
