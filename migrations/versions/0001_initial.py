"""initial: outbox_messages, outbox_attempts, outbox_workers

Revision ID: 0001
Revises:
Create Date: 2025-11-25

Creates exactly what ``outbox/schema.py`` defines. The partial indexes are partial on
PostgreSQL and SQLite; MariaDB/MySQL ignore the ``*_where`` options and get plain indexes.
Names are spelled out (``op.f``) so they match the metadata's naming convention everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from outbox.schema import UTCDateTime, utc_now

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias), not BIGINT.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
STATES = "'pending', 'inflight', 'committed', 'parked', 'cancelled', 'expired'"
OPEN = "state IN ('pending', 'inflight', 'parked')"


def upgrade() -> None:
    _create_messages()
    _create_attempts()
    _create_workers()


def downgrade() -> None:
    # Indexes go with their tables. (Dropping ix_outbox_attempts_message_id first would fail
    # on MariaDB: it backs the foreign key.)
    for table in ("outbox_workers", "outbox_attempts", "outbox_messages"):
        op.drop_table(table)


def _create_messages() -> None:
    op.create_table(
        "outbox_messages",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(64), nullable=False),
        sa.Column("method", sa.String(255), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("lane", sa.String(255), nullable=True),
        sa.Column("not_before", UTCDateTime(), nullable=True),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("reference", sa.String(255), nullable=True),
        sa.Column("state", sa.String(16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("last_code", sa.String(32), nullable=True),
        sa.Column("last_message", sa.Text(), nullable=True),
        sa.Column("park_reason", sa.String(32), nullable=True),
        sa.Column("maybe_executed", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("payload_fingerprint", sa.String(64), nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), server_default=utc_now(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=True),
        sa.Column("committed_at", UTCDateTime(), nullable=True),
        sa.Column("response", JSON, nullable=True),
        sa.CheckConstraint(f"state IN ({STATES})", name=op.f("ck_outbox_messages_state_valid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_messages")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_outbox_messages_idempotency_key")),
    )
    _partial_index("due", ["state", "next_attempt_at", "id"], "state = 'pending'")
    _partial_index("lane_open", ["lane", "state", "id"], f"lane IS NOT NULL AND {OPEN}")
    _partial_index("lease", ["state", "lease_expires_at"], "state = 'inflight'")
    op.create_index(
        op.f("ix_outbox_messages_state_updated"), "outbox_messages", ["state", "updated_at"]
    )


def _partial_index(name: str, columns: list[str], where: str) -> None:
    op.create_index(
        op.f(f"ix_outbox_messages_{name}"),
        "outbox_messages",
        columns,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def _create_attempts() -> None:
    op.create_table(
        "outbox_attempts",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("message_id", ID, nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("code", sa.String(32), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["outbox_messages.id"],
            name=op.f("fk_outbox_attempts_message_id_outbox_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_attempts")),
    )
    op.create_index(op.f("ix_outbox_attempts_message_id"), "outbox_attempts", ["message_id", "id"])


def _create_workers() -> None:
    op.create_table(
        "outbox_workers",
        sa.Column("worker_id", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("last_beat_at", UTCDateTime(), nullable=False),
        sa.Column("gate", sa.String(32), server_default="open", nullable=False),
        sa.Column("gate_reason", sa.Text(), nullable=True),
        sa.Column("gate_until", UTCDateTime(), nullable=True),
        sa.Column("stopped_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_outbox_workers")),
    )
