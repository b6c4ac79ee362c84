"""console indexes: the Rows page's filters, the Overview's counts and chart

Revision ID: 0011
Revises: 0010

Issue 14's benchmark (``python -m bench.console``, docs/scaling.md): the console's pages on
2,000,000 rows answer in under 200 ms. Each index serves one reader:

- ``ix_outbox_messages_state_reason`` ``(state, park_reason, id)``: rows of a state (and
  parked by reason) newest first; ``status`` counts each state by a bounded range of it and
  parked rows by reason, index only.
- ``ix_outbox_messages_created_at``: the Rows page's time range.
- ``ix_outbox_messages_maybe_executed`` ``(maybe_executed, state, id)``, partial on
  ``maybe_executed`` where the database can: ``status`` counts the open ones, index only.
- ``ix_outbox_messages_reference`` and ``ix_outbox_messages_key_prefix``: prefix searches
  (``LIKE 'abc%'``; ``outbox list --reference``, ``outbox show REF``); on PostgreSQL with the
  pattern operators, which any collation can use.
- ``ix_outbox_attempts_at`` ``(at, decision)``: the Overview's chart, index only.

Only adds indexes; on a large table PostgreSQL and MariaDB build each in one pass (minutes on
millions of rows, writes waiting meanwhile on PostgreSQL): run it in a quiet moment.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MESSAGES = "outbox_messages"
PATTERN = "varchar_pattern_ops"


def upgrade() -> None:
    op.create_index("ix_outbox_messages_state_reason", MESSAGES, ["state", "park_reason", "id"])
    op.create_index("ix_outbox_messages_created_at", MESSAGES, ["created_at"])
    maybe = sa.text("maybe_executed")
    op.create_index(
        "ix_outbox_messages_maybe_executed",
        MESSAGES,
        ["maybe_executed", "state", "id"],
        postgresql_where=maybe,
        sqlite_where=maybe,
    )
    op.create_index(
        "ix_outbox_messages_reference",
        MESSAGES,
        ["reference"],
        postgresql_ops={"reference": PATTERN},
    )
    op.create_index(
        "ix_outbox_messages_key_prefix",
        MESSAGES,
        ["idempotency_key"],
        postgresql_ops={"idempotency_key": PATTERN},
    )
    op.create_index("ix_outbox_attempts_at", "outbox_attempts", ["at", "decision"])


def downgrade() -> None:
    op.drop_index("ix_outbox_attempts_at", table_name="outbox_attempts")
    for name in ("key_prefix", "reference", "maybe_executed", "created_at", "state_reason"):
        op.drop_index(f"ix_outbox_messages_{name}", table_name=MESSAGES)
