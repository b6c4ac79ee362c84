"""History lines (``outbox_attempts``): every line the store writes goes through here.

Imports SQLAlchemy, ``outbox.schema``, ``outbox.payload`` and the store's rows only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from outbox.payload import bounded
from outbox.schema import attempts
from outbox.store.rows import HistoryLine

_ACTOR_LIMIT = attempts.c.actor.type.length or 255  # type: ignore[attr-defined]


def history_params(message_id: int, now: datetime, actor: str, call: HistoryLine) -> dict[str, Any]:
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


def add_history(
    conn: Connection, message_id: int, now: datetime, actor: str, call: HistoryLine
) -> None:
    conn.execute(attempts.insert().values(**history_params(message_id, now, actor, call)))


def add_lines(conn: Connection, lines: Sequence[dict[str, Any]]) -> None:
    """Many history lines (``history_params``) in one INSERT; none, no statement."""
    if lines:
        conn.execute(attempts.insert(), lines)
