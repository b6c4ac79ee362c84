"""outbox_workers: when the gate closed, and the methods the API key may not call

Revision ID: 0006
Revises: 0005

``outbox check`` warns on a rollover gate closed longer than ``[check] rollover_warning`` (the
guide's 3 minutes), says how long a maintenance pause has lasted, and names the methods held
because Recrypt refused them outside maintenance. Each worker's heartbeat now records:

- ``gate_since``: when its current gate closed (NULL while the gate is open);
- ``refused_methods``: the gRPC paths it holds because they answered PERMISSION_DENIED while
  Recrypt was not in maintenance, comma-separated (NULL for none).

Both columns are nullable and only added: a daemon of the previous version keeps beating
(leaving them NULL) while this runs. Its rows are read as "closed since an unknown time".
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from outbox.schema import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox_workers") as batch:
        batch.add_column(sa.Column("gate_since", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("refused_methods", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox_workers") as batch:
        batch.drop_column("refused_methods")
        batch.drop_column("gate_since")
