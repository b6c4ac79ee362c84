"""count attempts whose outcome was unknown apart from all attempts

Revision ID: 0003
Revises: 0002

``[retry] max_unknown_attempts`` bounds the attempts whose outcome we cannot know (transport
failures, UNKNOWN, INTERNAL, an expired lease...). Counting every attempt instead parked rows
after a long rollover, whose UNAVAILABLE vgw-db retries are documented and unbounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox_messages") as batch:
        batch.add_column(
            sa.Column("unknown_attempts", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("outbox_messages") as batch:
        batch.drop_column("unknown_attempts")
