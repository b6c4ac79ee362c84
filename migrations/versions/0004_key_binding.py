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

OPEN = "state IN ('pending', 'inflight', 'parked')"
#: Stored where the payload changed before this migration: not hex, so no formula matches it.
NEVER_MATCHES = "changed before migration 0004"
PG_PAYLOAD_ONLY = "encode(sha256(convert_to(payload::text, 'UTF8')), 'hex')"
PG_METHOD_AND_PAYLOAD = "encode(sha256(convert_to(method || chr(10) || payload::text, 'UTF8')), 'hex')"
PAGE = 500

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


def _rebind(pg_old: str, pg_new: str, old: Formula, new: Formula) -> None:
    """Open rows whose stored fingerprint is ``old``'s get ``new``'s; the others never match."""
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            sa.text(
                f"UPDATE outbox_messages SET payload_fingerprint = CASE WHEN payload_fingerprint "
                f"= {pg_old} THEN {pg_new} ELSE :never END "
                f"WHERE payload_fingerprint IS NOT NULL AND {OPEN}"
            ).bindparams(never=NEVER_MATCHES)
        )
    elif not context.is_offline_mode():  # --sql cannot compute in Python: nothing to print
        _rebind_in_python(old, new)


def _rebind_in_python(old: Formula, new: Formula) -> None:
    bind = op.get_bind()
    as_read = "CAST({} AS BLOB)" if bind.dialect.name == "sqlite" else "{}"  # as the claim reads
    select = sa.text(
        f"SELECT id, {as_read.format('method')} AS method, {as_read.format('payload')} AS payload, "
        f"payload_fingerprint FROM outbox_messages WHERE payload_fingerprint IS NOT NULL "
        f"AND {OPEN} AND id > :after ORDER BY id LIMIT {PAGE}"
    )
    update = sa.text("UPDATE outbox_messages SET payload_fingerprint = :fp WHERE id = :id")
    after = 0
    while rows := bind.execute(select, {"after": after}).all():
        fresh = [
            {"id": r.id, "fp": new(r.method, r.payload) if old(r.method, r.payload) == r[3] else NEVER_MATCHES}
            for r in rows
        ]
        bind.execute(update, fresh)
        after = rows[-1].id


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
