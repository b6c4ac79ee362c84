"""Operators' actions (``outbox requeue``, ``outbox cancel``): one row by its key, locked,
moved only from the states the action allows, with a history line naming the operator.

Imports SQLAlchemy, ``outbox.schema``, ``outbox.errors``, ``outbox.payload`` and the store's
own modules only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from outbox.errors import OperatorActionError, RowNotFoundError
from outbox.payload import bounded
from outbox.schema import State, messages
from outbox.store import heads as lane_heads
from outbox.store.history import add_history
from outbox.store.rows import HistoryLine
from outbox.vocabulary import HistoryDecision, HistoryKind

m = messages


def requeue(conn: Connection, key: str, actor: str, reason: str, now: datetime) -> None:
    """parked → pending, same key, due now."""
    row = _locked_row(conn, key)
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
    conn.execute(m.update().where(m.c.id == row.id, m.c.state == State.PARKED).values(**values))
    line = HistoryLine(HistoryKind.OPERATOR, HistoryDecision.REQUEUE, None, reason)
    add_history(conn, row.id, now, actor, line)
    if conn.dialect.name == "postgresql":  # wake a listening daemon (as an insert does)
        conn.execute(sa.text("SELECT pg_notify('outbox_messages', '')"))


def cancel(
    conn: Connection, key: str, actor: str, reason: str, now: datetime, *, force: bool
) -> None:
    """pending/parked → cancelled. Refuses a row that may have executed unless ``force``."""
    row = _locked_row(conn, key)
    _refuse_cancel(row, key, force)
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
    forced = force and row.maybe_executed
    decision = HistoryDecision.CANCEL_FORCED if forced else HistoryDecision.CANCEL
    add_history(conn, row.id, now, actor, HistoryLine(HistoryKind.OPERATOR, decision, None, reason))
    lane_heads.settle(conn, [row.id])


def _refuse_cancel(row: Any, key: str, force: bool) -> None:
    """A row in flight, finished, or that may have executed (without ``force``) stays."""
    if row.state not in (State.PENDING, State.PARKED):
        wait = " (wait for the call in flight to finish)" if row.state == "inflight" else ""
        raise OperatorActionError(
            f"row {key} is {row.state}: only pending or parked rows can be cancelled{wait}"
        )
    if row.maybe_executed and not force:
        raise OperatorActionError(
            f"row {key} may already have executed at Recrypt (maybe_executed): check on "
            "recrypt.net whether a transaction with this idempotency key happened; if it "
            "did not, cancel again with --force; if it did, requeue it (it will commit "
            "on ALREADY_EXISTS)"
        )


def _locked_row(conn: Connection, key: str) -> Any:
    row = conn.execute(
        sa.select(m.c.id, m.c.state, m.c.maybe_executed, m.c.park_reason)
        .where(m.c.idempotency_key == key)
        .with_for_update()
    ).first()
    if row is None:
        raise RowNotFoundError(f"no outbox row has idempotency_key {key}")
    return row
