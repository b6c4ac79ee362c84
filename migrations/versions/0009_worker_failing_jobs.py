"""outbox_workers.failing_jobs: the daemon's jobs that keep failing, for `outbox check`

Revision ID: 0009
Revises: 0008

Issue #12: `outbox check` and `outbox status` run in other processes than the daemon; the
daemon's heartbeat row tells them which of its jobs keep failing (which, since when, how many
runs, the last error), as a JSON list. Only adds a nullable column: running daemons can keep
going while it runs (an older daemon leaves it NULL).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox_workers", sa.Column("failing_jobs", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("outbox_workers", "failing_jobs")
