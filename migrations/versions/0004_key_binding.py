"""bind a key to one request: the fingerprint covers method and payload; tombstones of purged keys

Revision ID: 0004
Revises: 0003

- ``outbox_tombstones``: one row per key that retention purged, so the key is never accepted
  again for another request while Recrypt may still remember it.
- The stored fingerprint of every open row is rebound from the payload-only formula of 0001-0003
  to method + payload. Where the stored one no longer matches the old formula (the payload was
  edited after the first send), a value that never matches is stored, so the row is still
  parked ``payload_changed`` before a resend. The downgrade rebinds the other way.
  PostgreSQL computes both formulas in SQL (as its claim does); SQLite and MariaDB in Python.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import context, op

from outbox.payload import fingerprint
from outbox.schema import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Stored where the payload changed before this migration: not hex, so no formula matches it.
NEVER_MATCHES = "changed before migration 0004"
PAGE = 500

rows = sa.table(
    "outbox_messages",
    sa.column("id", sa.Integer),
    sa.column("method", sa.String),
    sa.column("payload", sa.Text),
    sa.column("payload_fingerprint", sa.String),
    sa.column("state", sa.String),
)
OPEN_BOUND = sa.and_(
    rows.c.payload_fingerprint.is_not(None), rows.c.state.in_(["pending", "inflight", "parked"])
)


def _pg_sha256(text: Any) -> Any:
    return sa.func.encode(sa.func.sha256(sa.func.convert_to(text, "UTF8")), "hex")


# PostgreSQL's claim hashes ``payload::text``, jsonb's canonical text (store.claims.build_claim).
PG_PAYLOAD_ONLY = _pg_sha256(sa.cast(rows.c.payload, sa.Text))
PG_METHOD_AND_PAYLOAD = _pg_sha256(rows.c.method + "\n" + sa.cast(rows.c.payload, sa.Text))

Formula = Callable[[Any, Any], str]


def upgrade() -> None:
    op.create_table(
        "outbox_tombstones",
        sa.Column("idempotency_key", sa.String(64), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.Column("final_state", sa.String(16), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=False),
        sa.Column("purged_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("idempotency_key", name=op.f("pk_outbox_tombstones")),
    )
    op.create_index(
        op.f("ix_outbox_tombstones_purged_at"), "outbox_tombstones", ["purged_at"], unique=False
    )
    _rebind(PG_PAYLOAD_ONLY, PG_METHOD_AND_PAYLOAD, _payload_only, fingerprint)


def downgrade() -> None:
    _rebind(PG_METHOD_AND_PAYLOAD, PG_PAYLOAD_ONLY, fingerprint, _payload_only)
    op.drop_table("outbox_tombstones")  # its index goes with it


def _rebind(pg_old: Any, pg_new: Any, old: Formula, new: Formula) -> None:
    """Open rows whose stored fingerprint is ``old``'s get ``new``'s; the others never match."""
    if op.get_context().dialect.name == "postgresql":
        matches = rows.c.payload_fingerprint == pg_old
        op.execute(
            rows.update()
            .where(OPEN_BOUND)
            .values(payload_fingerprint=sa.case((matches, pg_new), else_=sa.literal(NEVER_MATCHES)))
        )
    elif not context.is_offline_mode():  # --sql cannot compute in Python: nothing to print
        _rebind_in_python(old, new)


def _rebind_in_python(old: Formula, new: Formula) -> None:
    bind = op.get_bind()
    as_read = rows.c.method, rows.c.payload
    if bind.dialect.name == "sqlite":  # the bytes, as the claim reads them (columns.as_written)
        as_read = sa.cast(rows.c.method, sa.LargeBinary), sa.cast(rows.c.payload, sa.LargeBinary)
    page = (
        sa.select(rows.c.id, as_read[0].label("method"), as_read[1].label("payload"))
        .add_columns(rows.c.payload_fingerprint)
        .where(OPEN_BOUND)
        .order_by(rows.c.id)
        .limit(PAGE)
    )
    update = rows.update().where(rows.c.id == sa.bindparam("b_id"))
    after = 0
    while found := bind.execute(page.where(rows.c.id > after)).all():
        fresh = [{"b_id": row.id, "payload_fingerprint": _rebound(row, old, new)} for row in found]
        bind.execute(update, fresh)
        after = found[-1].id


def _rebound(row: Any, old: Formula, new: Formula) -> str:
    if old(row.method, row.payload) != row.payload_fingerprint:
        return NEVER_MATCHES  # changed after the first send: keep it caught
    return new(row.method, row.payload)


def _payload_only(_method: Any, payload: Any) -> str:
    """The fingerprint of revisions 0001-0003 (outbox.payload.fingerprint before 0004), frozen."""
    if isinstance(payload, (bytes, bytearray)):
        payload = bytes(payload).decode("utf-8", errors="replace")
    try:
        text = json.dumps(
            json.loads(payload), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
    except (ValueError, RecursionError, TypeError):
        text = payload if isinstance(payload, str) else repr(payload)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
