"""Operators' actions (``outbox requeue``, ``outbox cancel``): each row locked, judged by
``outbox.operations`` and moved by one guarded UPDATE (``WHERE id AND state`` as read), with
a history line naming the operator and why. A row that moved meanwhile is skipped and
reported, never overwritten. By key, by several keys, or by filter in batches
(``requeue_matching``, ``cancel_matching``: one transaction per batch).

A requeue resets the row's count of unknown outcomes: it then gets ``[retry]
max_unknown_attempts`` further unknown outcomes before it parks ``unknown_outcome`` again.

Imports SQLAlchemy, ``outbox.schema``, ``outbox.errors``, ``outbox.payload``,
``outbox.operations``, ``outbox.filters`` and the store's own modules only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from outbox.errors import OperatorActionError, RowNotFoundError
from outbox.filters import RowFilter
from outbox.operations import Ruling, cancel_ruling, decider_refusal, requeue_ruling
from outbox.payload import bounded
from outbox.schema import State, messages
from outbox.store import approvals
from outbox.store import heads as lane_heads
from outbox.store.history import add_history
from outbox.store.rows import Approval, HistoryLine, Skipped
from outbox.store.selection import criteria
from outbox.vocabulary import ApprovalDecision, HistoryDecision, HistoryKind

m = messages
NO_ROW = "no such row"
MOVED = "moved meanwhile (its state or data changed since it was selected): left as it is"


@dataclass(frozen=True)
class Act:
    """One action as the operator asked it: who, why, when, and the cancel's options."""

    action: str  # requeue | cancel
    actor: str
    reason: str
    now: datetime
    force: bool = False
    dual_control: bool = False

    def rule(self, row: Any) -> Ruling:
        if self.action == "requeue":
            return requeue_ruling(row.state)
        return cancel_ruling(
            row.state, bool(row.maybe_executed), force=self.force, dual_control=self.dual_control
        )


@dataclass
class Done:
    """What one batch did (``BulkResult``'s parts)."""

    acted: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    requested: list[tuple[str, int]] = field(default_factory=list)


# ---- one row (``Store.requeue``, ``Store.cancel``): a refusal raises


def requeue(conn: Connection, key: str, actor: str, reason: str, now: datetime) -> None:
    """parked → pending, same key, due now."""
    _one(conn, key, Act("requeue", actor, reason, now))


def cancel(
    conn: Connection,
    key: str,
    actor: str,
    reason: str,
    now: datetime,
    *,
    force: bool,
    dual_control: bool = False,
) -> None:
    """pending/parked → cancelled. Refuses a row that may have executed unless ``force``;
    under dual control a forced one becomes a request (``approvals``)."""
    _one(conn, key, Act("cancel", actor, reason, now, force, dual_control))


def _one(conn: Connection, key: str, act: Act) -> None:
    rows = locked_rows(conn, [m.c.idempotency_key == key])
    if not rows:
        raise RowNotFoundError(f"no outbox row has idempotency_key {key}")
    done = apply(conn, rows, act)
    if done.skipped:
        raise OperatorActionError(f"row {key} {done.skipped[0].why}")


# ---- many rows: one batch per transaction


def act_on_keys(conn: Connection, keys: Sequence[str], act: Act) -> Done:
    """The rows with these keys; a key with no row is skipped."""
    rows = locked_rows(conn, [m.c.idempotency_key.in_(list(keys))])
    found = {row.idempotency_key for row in rows}
    done = apply(conn, rows, act)
    missing = [Skipped(key, NO_ROW) for key in keys if key not in found]
    done.skipped[:0] = missing
    return done


def act_on_ids(
    conn: Connection, selected: Sequence[tuple[int, str]], wanted: RowFilter, act: Act
) -> Done:
    """Rows a filter selected (id, key), locked again under the same filter: one that no
    longer matches moved meanwhile, and is skipped."""
    ids = [row_id for row_id, _key in selected]
    rows = locked_rows(conn, [m.c.id.in_(ids), *criteria(wanted)])
    found = {row.id for row in rows}
    done = apply(conn, rows, act)
    done.skipped[:0] = [Skipped(key, MOVED) for row_id, key in selected if row_id not in found]
    return done


def locked_rows(conn: Connection, where: list[sa.ColumnElement[bool]]) -> list[Any]:
    query = sa.select(
        m.c.id, m.c.idempotency_key, m.c.state, m.c.maybe_executed, m.c.park_reason
    ).where(*where)
    return list(conn.execute(query.order_by(m.c.id).with_for_update()).all())


def apply(conn: Connection, rows: Sequence[Any], act: Act) -> Done:
    """Each row judged by the rules, then moved by its guarded transition."""
    done = Done()
    for row in rows:
        ruling = act.rule(row)
        if ruling.decision is None:
            done.skipped.append(Skipped(row.idempotency_key, str(ruling.refusal)))
        elif ruling.decision == HistoryDecision.CANCEL_REQUESTED:
            request = approvals.request(conn, row, act.actor, act.reason, act.now)
            done.requested.append((row.idempotency_key, request))
        elif _move(conn, row, ruling.decision, act):
            done.acted.append(row.idempotency_key)
        else:
            done.skipped.append(Skipped(row.idempotency_key, MOVED))
    _after(conn, act, done, rows)
    return done


def _after(conn: Connection, act: Act, done: Done, rows: Sequence[Any]) -> None:
    if not done.acted:
        return
    if act.action == "cancel":
        acted = set(done.acted)
        lane_heads.settle(conn, [row.id for row in rows if row.idempotency_key in acted])
    elif conn.dialect.name == "postgresql":  # wake a listening daemon (as an insert does)
        conn.execute(sa.text("SELECT pg_notify('outbox_messages', '')"))


def _move(conn: Connection, row: Any, decision: HistoryDecision, act: Act) -> bool:
    """The guarded transition: ``WHERE id AND state`` as read; False: the row moved."""
    values = requeued(row) if act.action == "requeue" else cancelled()
    verb = "requeued" if act.action == "requeue" else "cancelled"
    values |= {
        "last_message": bounded(f"{verb} by {act.actor}: {act.reason}"),
        "updated_at": act.now,
    }
    guarded = m.update().where(m.c.id == row.id, m.c.state == row.state).values(**values)
    if conn.execute(guarded).rowcount != 1:
        return False
    line = HistoryLine(HistoryKind.OPERATOR, decision, None, act.reason)
    add_history(conn, row.id, act.now, act.actor, line)
    return True


def requeued(row: Any) -> dict[str, Any]:
    """A parked row sent again: due now, its unknown outcomes counted afresh."""
    values: dict[str, Any] = {
        "state": State.PENDING,
        "next_attempt_at": None,
        "park_reason": None,
        "unknown_attempts": 0,  # [retry] max_unknown_attempts further unknown outcomes
    }
    if row.park_reason == "expired_unknown":
        values["expires_at"] = None  # the operator decided to send it after all
    return values


def cancelled() -> dict[str, Any]:
    return {"state": State.CANCELLED, "lane_behind": False, "next_attempt_at": None}


# ---- dual control: a second operator decides a request


def approve(conn: Connection, approval_id: int, actor: str, reason: str, now: datetime) -> Approval:
    """The request's action carried out by its guarded transition, in the approver's name."""
    found, row = _decidable(conn, approval_id, actor)
    ruling = cancel_ruling(row.state, bool(row.maybe_executed), force=True, dual_control=False)
    if ruling.decision is None:
        raise OperatorActionError(
            f"row {found.idempotency_key} {ruling.refusal}: reject request #{approval_id}"
        )
    why = f"{reason} (request #{found.id} by {found.requested_by}: {found.reason})"
    if not _move(conn, row, HistoryDecision.CANCEL_APPROVED, Act("cancel", actor, why, now)):
        raise OperatorActionError(f"row {found.idempotency_key} {MOVED}")
    lane_heads.settle(conn, [row.id])
    approved = ApprovalDecision.APPROVED
    return approvals.decide(conn, found, actor=actor, decision=approved, note=reason, now=now)


def reject(conn: Connection, approval_id: int, actor: str, reason: str, now: datetime) -> Approval:
    """The request closed without acting; the row's history says who rejected it and why."""
    found, row = _decidable(conn, approval_id, actor)
    text = f"request #{found.id} by {found.requested_by} rejected: {reason}"
    line = HistoryLine(HistoryKind.OPERATOR, HistoryDecision.CANCEL_REJECTED, None, text)
    add_history(conn, row.id, now, actor, line)
    rejected = ApprovalDecision.REJECTED
    return approvals.decide(conn, found, actor=actor, decision=rejected, note=reason, now=now)


def _decidable(conn: Connection, approval_id: int, actor: str) -> tuple[Approval, Any]:
    """The open request and its row, both locked; the requester may not decide it."""
    found = approvals.open_request(conn, approval_id)
    refusal = decider_refusal(found.requested_by, actor)
    if refusal is not None:
        raise OperatorActionError(refusal)
    rows = locked_rows(conn, [m.c.idempotency_key == found.idempotency_key])
    if not rows:
        raise RowNotFoundError(f"no outbox row has idempotency_key {found.idempotency_key}")
    return found, rows[0]
