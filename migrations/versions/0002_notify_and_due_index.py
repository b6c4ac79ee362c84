"""wake-ups on insert (PostgreSQL), and a due index ordered by id

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# FOR EACH STATEMENT, and PostgreSQL delivers identical notifications of one transaction once:
# a writer inserting many rows in a transaction costs one NOTIFY, not one per row.
NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION outbox_messages_notify() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('outbox_messages', '');
  RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
NOTIFY_TRIGGER = """
CREATE TRIGGER outbox_messages_notify AFTER INSERT ON outbox_messages
FOR EACH STATEMENT EXECUTE FUNCTION outbox_messages_notify()
"""


def upgrade() -> None:
    bind = op.get_bind()
    # The claim walks pending rows in id order: index exactly that, so the cost of a claim
    # does not grow with the finished rows (partial where the database can).
    op.drop_index("ix_outbox_messages_due", table_name="outbox_messages")
    op.create_index(
        "ix_outbox_messages_due",
        "outbox_messages",
        ["state", "id"],
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )
    if bind.dialect.name == "postgresql":
        op.execute(NOTIFY_FUNCTION)
        op.execute(NOTIFY_TRIGGER)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS outbox_messages_notify ON outbox_messages")
        op.execute("DROP FUNCTION IF EXISTS outbox_messages_notify()")
    op.drop_index("ix_outbox_messages_due", table_name="outbox_messages")
    op.create_index(
        "ix_outbox_messages_due",
        "outbox_messages",
        ["state", "next_attempt_at", "id"],
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )
