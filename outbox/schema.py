"""The tables, as SQLAlchemy metadata. Alembic's ``env.py`` compares migrations against this.

Writers set only the columns of SPEC §3 (``idempotency_key``, ``method``, ``payload``, ``lane``,
``not_before``, ``expires_at``, ``reference``); every other column has a default or is NULL.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class State(enum.StrEnum):
    """Row states (SPEC §4). Each says who moves a row out of it."""

    PENDING = "pending"  # waiting to be sent; the dispatcher claims it when due
    INFLIGHT = "inflight"  # claimed under a lease; the dispatcher records the outcome
    COMMITTED = "committed"  # terminal: Recrypt answered OK or ALREADY_EXISTS
    PARKED = "parked"  # waits for a human: `outbox requeue` or `outbox cancel`
    CANCELLED = "cancelled"  # terminal: an operator cancelled it
    EXPIRED = "expired"  # terminal: expires_at passed before any attempt could have executed


OPEN_STATES = (State.PENDING, State.INFLIGHT, State.PARKED)
FINISHED_STATES = (State.COMMITTED, State.CANCELLED, State.EXPIRED)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timestamps are UTC everywhere: stored naive-UTC or timestamptz, returned aware UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the outbox; pass an aware UTC datetime")
        value = value.astimezone(UTC)
        if dialect.name == "postgresql":
            return value
        return value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class utc_now(sa.sql.expression.FunctionElement[datetime]):
    """The current time in UTC whatever the writer's session time zone (a column default).

    MariaDB/MySQL ``CURRENT_TIMESTAMP`` follows the session time zone, so a plain-SQL writer in
    ``+05:00`` would store a time five hours off; ``UTC_TIMESTAMP(6)`` does not.
    """

    type = sa.DateTime()
    inherit_cache = True


@compiles(utc_now)
def _utc_now_default(_element: utc_now, _compiler: SQLCompiler, **_kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(utc_now, "mysql")
@compiles(utc_now, "mariadb")
def _utc_now_mysql(_element: utc_now, _compiler: SQLCompiler, **_kw: Any) -> str:
    return "(UTC_TIMESTAMP(6))"


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


_id_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_state_values = ", ".join(f"'{s.value}'" for s in State)
_open_sql = "state IN ('pending', 'inflight', 'parked')"

messages = sa.Table(
    "outbox_messages",
    metadata,
    sa.Column("id", _id_type, primary_key=True, autoincrement=True),
    # --- the writers' contract (SPEC §3) ---
    sa.Column("idempotency_key", sa.String(64), nullable=False),
    sa.Column("method", sa.String(255), nullable=False),
    sa.Column("payload", _json(), nullable=False),
    sa.Column("lane", sa.String(255), nullable=True),
    sa.Column("not_before", UTCDateTime(), nullable=True),
    sa.Column("expires_at", UTCDateTime(), nullable=True),
    sa.Column("reference", sa.String(255), nullable=True),
    # --- maintained by the daemon ---
    sa.Column("state", sa.String(16), nullable=False, server_default=State.PENDING.value),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    # attempts whose outcome was unknown: bounded by [retry] max_unknown_attempts (0003)
    sa.Column("unknown_attempts", sa.Integer(), nullable=False, server_default="0"),
    # NULL means "due now": a writer's session time zone can never delay a row.
    sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
    sa.Column("last_code", sa.String(32), nullable=True),
    sa.Column("last_message", sa.Text(), nullable=True),
    sa.Column("park_reason", sa.String(32), nullable=True),
    sa.Column("maybe_executed", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("payload_fingerprint", sa.String(64), nullable=True),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False, server_default=utc_now()),
    sa.Column("updated_at", UTCDateTime(), nullable=True),
    sa.Column("committed_at", UTCDateTime(), nullable=True),
    sa.Column("response", _json(), nullable=True),
    sa.UniqueConstraint("idempotency_key"),
    sa.CheckConstraint(f"state IN ({_state_values})", name="state_valid"),
    # The claim walks pending rows in id order. Partial where the database can (migration 0002).
    sa.Index(
        "ix_outbox_messages_due",
        "state",
        "id",
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    ),
    # Lanes: is there an earlier open row in this lane?
    sa.Index(
        "ix_outbox_messages_lane_open",
        "lane",
        "state",
        "id",
        postgresql_where=sa.text(f"lane IS NOT NULL AND {_open_sql}"),
        sqlite_where=sa.text(f"lane IS NOT NULL AND {_open_sql}"),
    ),
    # The lease reaper: inflight rows whose lease ran out.
    sa.Index(
        "ix_outbox_messages_lease",
        "state",
        "lease_expires_at",
        postgresql_where=sa.text("state = 'inflight'"),
        sqlite_where=sa.text("state = 'inflight'"),
    ),
    # Retention and `outbox list --state`: finished rows by age.
    sa.Index("ix_outbox_messages_state_updated", "state", "updated_at"),
)

attempts = sa.Table(
    "outbox_attempts",
    metadata,
    sa.Column("id", _id_type, primary_key=True, autoincrement=True),
    sa.Column(
        "message_id",
        _id_type,
        sa.ForeignKey("outbox_messages.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("at", UTCDateTime(), nullable=False),
    # 'call' (one gRPC call), 'operator' (requeue/cancel), 'system' (bad row, lease expiry...)
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("actor", sa.String(255), nullable=True),  # worker id or operator user@host
    sa.Column("code", sa.String(32), nullable=True),
    sa.Column("message", sa.Text(), nullable=True),
    sa.Column("decision", sa.String(32), nullable=False),
    sa.Column("duration_ms", sa.Float(), nullable=True),
    sa.Index("ix_outbox_attempts_message_id", "message_id", "id"),
)

workers = sa.Table(
    "outbox_workers",
    metadata,
    sa.Column("worker_id", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("last_beat_at", UTCDateTime(), nullable=False),
    sa.Column("gate", sa.String(32), nullable=False, server_default="open"),
    sa.Column("gate_reason", sa.Text(), nullable=True),
    sa.Column("gate_until", UTCDateTime(), nullable=True),
    sa.Column("stopped_at", UTCDateTime(), nullable=True),
)


def utcnow() -> datetime:
    """The one clock helper for the store's defaults; the dispatcher injects its own clock."""
    return datetime.now(UTC)
