"""Writers' inserts: one row on the caller's connection, inside the caller's transaction.

Used by ``outbox.writer`` and tests. Imports SQLAlchemy, ``outbox.schema``, ``outbox.errors``
and the store's own modules only.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from outbox.errors import DuplicateKeyError
from outbox.schema import messages, tombstones
from outbox.store.columns import aware
from outbox.store.rows import NewRow
from outbox.store.tx import lock_lane

m = messages


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
            f"idempotency_key {key} was used by a row purged on {aware(purged):%Y-%m-%d}; "
            "Recrypt may still hold that request under the key, so it is never sent again: "
            "use a new key for a new transfer"
        )


def new_key() -> str:
    return str(uuid.uuid4())
