"""Dual control's requests (``outbox_approvals``): an action that needs a second operator
waits here, open, until a different operator approves or rejects it
(``operator.approve``/``operator.reject`` carry the action out and call ``decide``).

Imports SQLAlchemy, ``outbox.schema``, ``outbox.errors`` and the store's own modules only.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from outbox.errors import OperatorActionError
from outbox.payload import bounded
from outbox.schema import approvals as a
from outbox.store.columns import aware
from outbox.store.history import add_history
from outbox.store.rows import Approval, HistoryLine
from outbox.vocabulary import ApprovalAction, HistoryDecision, HistoryKind

_WHO = a.c.requested_by.type.length or 255  # type: ignore[attr-defined]


def request(conn: Connection, row: Any, actor: str, reason: str, now: datetime) -> int:
    """A forced cancel of ``row`` asked for: the request's id (an open one is reused), and a
    ``cancel_requested`` line in the row's history."""
    key = row.idempotency_key
    found = conn.execute(
        sa.select(a.c.id).where(a.c.idempotency_key == key, a.c.decision.is_(None))
    ).scalar()
    if found is not None:
        return int(found)
    made = conn.execute(
        a.insert().values(
            idempotency_key=key,
            action=ApprovalAction.CANCEL_FORCED,
            requested_by=bounded(actor, _WHO),
            reason=reason,
            requested_at=now,
        )
    )
    approval_id = int(made.inserted_primary_key[0])  # type: ignore[index]
    text = f"request #{approval_id}: {reason} (a second operator must approve: dual control)"
    line = HistoryLine(HistoryKind.OPERATOR, HistoryDecision.CANCEL_REQUESTED, None, text)
    add_history(conn, row.id, now, actor, line)
    return approval_id


def open_request(conn: Connection, approval_id: int) -> Approval:
    """The open request ``approval_id``, locked until the transaction ends."""
    row = conn.execute(sa.select(a).where(a.c.id == approval_id).with_for_update()).first()
    if row is None:
        raise OperatorActionError(f"no approval request #{approval_id}: see `outbox approvals`")
    found = approval(row)
    if found.decision is not None:
        raise OperatorActionError(
            f"request #{approval_id} was already {found.decision} by {found.decided_by}"
        )
    return found


def decide(
    conn: Connection, found: Approval, *, actor: str, decision: str, note: str, now: datetime
) -> Approval:
    conn.execute(
        a.update()
        .where(a.c.id == found.id, a.c.decision.is_(None))
        .values(decided_by=bounded(actor, _WHO), decision=decision, decided_at=now, note=note)
    )
    return replace(found, decided_by=actor, decision=decision, decided_at=now, note=note)


def list_requests(conn: Connection, *, open_only: bool = True, limit: int = 200) -> list[Approval]:
    query = sa.select(a).order_by(a.c.id.desc()).limit(limit)
    if open_only:
        query = query.where(a.c.decision.is_(None))
    return [approval(row) for row in conn.execute(query)]


def count_open(conn: Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).where(a.c.decision.is_(None))).scalar_one())


def approval(row: sa.Row[Any]) -> Approval:
    data = {k: aware(v) if isinstance(v, datetime) else v for k, v in row._mapping.items()}
    return Approval(**data)
