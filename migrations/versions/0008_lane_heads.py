"""lane heads: only a lane's first open row is a claim candidate

Revision ID: 0008
Revises: 0007

Issue #11: 200,000 rows of one lane behind its parked head were pending and due, so every
claim walked them (and filtered them out one by one).

- ``lane_behind`` (boolean, kept by the daemon: ``outbox.store.heads``): NULL for a row no
  daemon has sorted yet, TRUE while it waits behind an earlier open row of its lane, FALSE for
  a lane's head (and any row claimed once). Writers leave it NULL.
- ``due_at`` is generated again, NULL unless the row is a claim candidate: pending and not
  ``lane_behind``. Its index becomes ``(due_at, id)``, partial on ``due_at IS NOT NULL``
  where the database can: PostgreSQL drops a qual that a partial index's predicate implies
  (``state = 'pending'`` in a plain SELECT), and 0007's leading ``state`` column then made
  the "oldest due" gauge scan the whole index. The column is dropped and added (with its
  index): the table is rewritten on PostgreSQL and MariaDB, so run this in a quiet moment
  on a large table.
- ``ix_outbox_messages_lane_behind`` ``(lane_behind, lane, id)``, partial on laned rows where
  the database can: the rows to sort, and each lane's first waiting row.

Existing rows are sorted here: a pending row with an earlier open row of its lane waits
(TRUE); every other laned row is FALSE.
"""

# ruff: noqa: S608  (the SQL is built from this file's constants)
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from outbox.schema import DueAt, UTCDateTime, due_at_0007

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("state = 'pending'")
HAS_DUE_AT = sa.text("due_at IS NOT NULL")
LANED = sa.text("lane IS NOT NULL")
OPEN = "('pending', 'inflight', 'parked')"


def upgrade() -> None:
    op.add_column("outbox_messages", sa.Column("lane_behind", sa.Boolean(), nullable=True))
    _sort_existing_rows()
    _replace_due_at(DueAt(), ["due_at", "id"], HAS_DUE_AT)
    _partial_index("ix_outbox_messages_lane_behind", ["lane_behind", "lane", "id"], LANED)


def downgrade() -> None:
    op.drop_index("ix_outbox_messages_lane_behind", table_name="outbox_messages")
    _replace_due_at(due_at_0007(op.get_bind().dialect.name), ["state", "due_at", "id"], PENDING)
    op.drop_column("outbox_messages", "lane_behind")


def _replace_due_at(computed: sa.Computed, columns: list[str], where: sa.TextClause) -> None:
    """``due_at`` generated as ``computed``, and its index over ``columns``, partial on
    ``where`` where the database can (a generated expression cannot be altered in place)."""
    op.drop_index("ix_outbox_messages_due", table_name="outbox_messages")
    op.drop_column("outbox_messages", "due_at")
    op.add_column("outbox_messages", sa.Column("due_at", UTCDateTime(), computed, nullable=True))
    _partial_index("ix_outbox_messages_due", columns, where)


def _partial_index(name: str, columns: list[str], where: sa.TextClause) -> None:
    op.create_index(name, "outbox_messages", columns, postgresql_where=where, sqlite_where=where)


def _sort_existing_rows() -> None:
    """Waiting rows TRUE, every other laned row FALSE: the daemon sorts only new rows."""
    bind = op.get_bind()
    waiting = bind.execute(
        sa.text(
            "SELECT later.id FROM outbox_messages later WHERE later.state = 'pending' "
            "AND later.lane IS NOT NULL AND EXISTS (SELECT 1 FROM outbox_messages earlier "
            f"WHERE earlier.lane = later.lane AND earlier.state IN {OPEN} "
            "AND earlier.id < later.id)"
        )
    ).scalars()
    ids = list(waiting)
    for start in range(0, len(ids), 10_000):
        chunk = ids[start : start + 10_000]
        bind.execute(
            sa.text("UPDATE outbox_messages SET lane_behind = :yes WHERE id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"yes": True, "ids": chunk},
        )
    bind.execute(
        sa.text(
            "UPDATE outbox_messages SET lane_behind = :no "
            "WHERE lane IS NOT NULL AND lane_behind IS NULL"
        ),
        {"no": False},
    )
