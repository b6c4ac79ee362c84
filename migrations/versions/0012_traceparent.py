"""traceparent: the writer's W3C trace context, for the daemon's spans (issue 15)

Revision ID: 0012
Revises: 0011

A nullable writers' column ``traceparent`` on ``outbox_messages``: ``outbox.enqueue`` fills it
from the current OpenTelemetry context, a plain-SQL writer may set it (README, "Tracing"), and
the daemon's span of each send attempt joins that trace. Adding a nullable column without a
default changes no row: instant on PostgreSQL and MariaDB, a schema edit on SQLite.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: As ``outbox.schema.TRACEPARENT_LENGTH`` (a migration never imports the app's code).
LENGTH = 128


def upgrade() -> None:
    op.add_column("outbox_messages", sa.Column("traceparent", sa.String(LENGTH), nullable=True))


def downgrade() -> None:
    op.drop_column("outbox_messages", "traceparent")
