"""operators' actions: holds, dual-control approvals, the payload as first sent

Revision ID: 0010
Revises: 0009

Issue #14:
- ``outbox_holds``: a lane or a method an operator held; no daemon claims its rows.
- ``outbox_approvals``: requests for an action that needs a second operator (dual control).
- ``outbox_messages.first_payload``: the payload as first claimed, so a ``payload_changed``
  row can show what changed (NULL for rows claimed before this migration).
(``outbox list --reference`` and ``outbox show REF`` read ``ix_outbox_messages_reference``,
made by 0011 with the console's other indexes.)
Adds tables and a nullable column: running daemons can keep going while it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from outbox.schema import UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("outbox_messages", sa.Column("first_payload", JSON, nullable=True))
    _create_holds()
    _create_approvals()


def _create_holds() -> None:
    op.create_table(
        "outbox_holds",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.String(255), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("held_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("kind IN ('lane', 'method')", name=op.f("ck_outbox_holds_kind_valid")),
        sa.PrimaryKeyConstraint("kind", "value", name=op.f("pk_outbox_holds")),
    )


def _create_approvals() -> None:
    op.create_table(
        "outbox_approvals",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("requested_by", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("requested_at", UTCDateTime(), nullable=False),
        sa.Column("decided_by", sa.String(255), nullable=True),
        sa.Column("decision", sa.String(16), nullable=True),
        sa.Column("decided_at", UTCDateTime(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_approvals")),
    )
    op.create_index(op.f("ix_outbox_approvals_decision"), "outbox_approvals", ["decision", "id"])
    op.create_index(
        op.f("ix_outbox_approvals_idempotency_key"), "outbox_approvals", ["idempotency_key"]
    )


def downgrade() -> None:
    op.drop_table("outbox_approvals")
    op.drop_table("outbox_holds")
    op.drop_column("outbox_messages", "first_payload")
