"""The tables, as SQLAlchemy metadata. Alembic's ``env.py`` compares migrations against this.

Writers set only the columns of SPEC §3 (``idempotency_key``, ``method``, ``payload``, ``lane``,
``not_before``, ``expires_at``, ``reference``); every other column has a default or is NULL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

# Row states are defined in the vocabulary; importing them from here still works (``__all__``).
from outbox.vocabulary import FINISHED_STATES, OPEN_STATES, GateState, State

__all__ = [
    "DUE_AT_0007",
    "DUE_NOW",
    "FINISHED_STATES",
    "INFLIGHT_LANE_SQL",
    "NAMING_CONVENTION",
    "OPEN_STATES",
    "DueAt",
    "InflightLane",
    "State",
    "UTCDateTime",
    "approvals",
    "attempts",
    "due_at_0007",
    "holds",
    "lanes",
    "messages",
    "metadata",
    "tombstones",
    "utc_now",
    "workers",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


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
        if isinstance(value, str):  # a driver that could not read it (MariaDB's zero date)
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        """Reading never fails on a stored value: one that is not a time comes back as text.

        The databases refuse such values from writers (migration 0005 on SQLite), but a row
        written before, or around the guards, must still show in ``outbox show`` as it is
        stored (an epoch number on SQLite, ``0000-00-00 00:00:00`` on MariaDB) rather than
        crash it. Nothing compares what it reads here: the claim compares in SQL.
        """
        process = super().result_processor(dialect, coltype)

        def lenient(value: Any) -> Any:
            try:
                return process(value) if process else value
            except (TypeError, ValueError):
                return str(value)

        return lenient


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
    # None is SQL NULL ("no response"), not the JSON text 'null'
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )


INFLIGHT_LANE_SQL = "CASE WHEN state = 'inflight' THEN lane END"


class InflightLane(sa.Computed):
    """``inflight_lane``: the row's lane while it is in flight; STORED, VIRTUAL on SQLite.

    One generated column with one UNIQUE index works on all three databases (MariaDB has no
    partial indexes). SQLite's ALTER TABLE cannot add a STORED column, and rebuilding
    ``outbox_messages`` there would cascade-delete the attempt history (DROP TABLE runs ON
    DELETE CASCADE while foreign keys are on, and a migration cannot turn them off inside its
    transaction); an index on a VIRTUAL column stores the value, so it enforces the same.
    """

    def __init__(self) -> None:
        super().__init__(INFLIGHT_LANE_SQL, persisted=True)


@compiles(InflightLane, "sqlite")
def _inflight_lane_sqlite(_element: InflightLane, _compiler: Any, **_kw: Any) -> str:
    return f"GENERATED ALWAYS AS ({INFLIGHT_LANE_SQL}) VIRTUAL"


#: "Due now" as a time: a row with neither ``not_before`` nor ``next_attempt_at`` sorts first.
DUE_NOW = "1970-01-01 00:00:00"
#: When a row may be sent, by dialect, before lanes were taken into account (migration 0007).
DUE_AT_0007 = {
    # GREATEST skips NULLs on PostgreSQL, returns NULL on MariaDB; MAX() is SQLite's.
    "postgresql": f"COALESCE(GREATEST(not_before, next_attempt_at), '{DUE_NOW}+00'::timestamptz)",
    "mysql": f"COALESCE(GREATEST(COALESCE(not_before, next_attempt_at), "
    f"COALESCE(next_attempt_at, not_before)), '{DUE_NOW}')",
    "sqlite": f"COALESCE(MAX(COALESCE(not_before, next_attempt_at), "
    f"COALESCE(next_attempt_at, not_before)), '{DUE_NOW}.000000')",
}


def due_at_0007(dialect: str) -> sa.Computed:
    """``due_at`` as migration 0007 created it (0007's upgrade, 0008's downgrade)."""
    sql = DUE_AT_0007["mysql" if dialect == "mariadb" else dialect]
    return sa.Computed(sa.text(sql), persisted=True if dialect != "sqlite" else None)


#: Only a claim candidate has one (0008): not a row that is not pending, nor one waiting
#: behind an earlier open row of its lane (``lane_behind``). NULL or FALSE lane_behind with
#: ``state <> 'pending'`` false makes the condition NULL or FALSE: the row is due.
_DUE_AT = {
    name: f"CASE WHEN state <> 'pending' OR lane_behind THEN NULL ELSE {sql} END"
    for name, sql in DUE_AT_0007.items()
}


class DueAt(sa.Computed):
    """``due_at``: when a pending row may be sent, the later of ``not_before`` and
    ``next_attempt_at`` (``DUE_NOW`` if neither is set); NULL for a row that is not pending or
    waits behind an earlier open row of its lane (``lane_behind``), so only claim candidates
    are in its index's range. Generated by the database, so every transition and every
    plain-SQL writer keeps it current; STORED, VIRTUAL on SQLite (see ``InflightLane``: its
    index stores the value). The claim walks it (migrations 0007, 0008).
    """

    def __init__(self) -> None:
        super().__init__(sa.text(_DUE_AT["postgresql"]), persisted=True)


@compiles(DueAt, "postgresql")
def _due_at_postgresql(_element: DueAt, _compiler: Any, **_kw: Any) -> str:
    return f"GENERATED ALWAYS AS ({_DUE_AT['postgresql']}) STORED"


@compiles(DueAt, "mysql")
@compiles(DueAt, "mariadb")
def _due_at_mysql(_element: DueAt, _compiler: Any, **_kw: Any) -> str:
    return f"GENERATED ALWAYS AS ({_DUE_AT['mysql']}) STORED"


@compiles(DueAt, "sqlite")
def _due_at_sqlite(_element: DueAt, _compiler: Any, **_kw: Any) -> str:
    return f"GENERATED ALWAYS AS ({_DUE_AT['sqlite']}) VIRTUAL"


_id_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_state_values = ", ".join(f"'{s.value}'" for s in State)
_open_sql = "state IN ('pending', 'inflight', 'parked')"

#: Room for a W3C traceparent (55 characters in version 00) and a later version's additions.
TRACEPARENT_LENGTH = 128

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
    # The writer's W3C trace context (``00-<trace id>-<span id>-<flags>``, 55 characters; room
    # for a later version's longer form): the daemon's spans join that trace (migration 0012).
    # Read as a hint: a value that is not a traceparent is ignored, never sent, never parks.
    sa.Column("traceparent", sa.String(TRACEPARENT_LENGTH), nullable=True),
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
    # The row's lane while it is in flight, else NULL; unique: one row of a lane in flight (0005).
    sa.Column("inflight_lane", sa.String(255), InflightLane(), nullable=True),
    # A laned row's place, kept by the daemon (``outbox.store.heads``, migration 0008): NULL
    # not sorted yet (a writer's new row: a claim candidate), TRUE waiting behind an earlier
    # open row of its lane (never a candidate), FALSE its lane's head, or claimed once.
    sa.Column("lane_behind", sa.Boolean(), nullable=True),
    # When the row may be sent: the later of not_before and next_attempt_at (migration 0007),
    # NULL while it waits behind its lane (0008).
    sa.Column("due_at", UTCDateTime(), DueAt(), nullable=True),
    # The payload as first claimed (sent), kept when it is later edited: ``outbox show`` of a
    # ``payload_changed`` row shows what changed (migration 0010; NULL: never claimed since).
    sa.Column("first_payload", _json(), nullable=True),
    sa.UniqueConstraint("idempotency_key"),
    sa.CheckConstraint(f"state IN ({_state_values})", name="state_valid"),
    # The claim walks due rows in (due_at, id) order, reading only rows it can send: rows
    # scheduled later are past the range's end, rows that are not candidates have no due_at
    # (0008). Not (state, due_at): PostgreSQL drops a qual its partial index implies, and
    # a leading column without a qual turns the range into a whole-index scan.
    sa.Index(
        "ix_outbox_messages_due",
        "due_at",
        "id",
        postgresql_where=sa.text("due_at IS NOT NULL"),
        sqlite_where=sa.text("due_at IS NOT NULL"),
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
    # Lanes: at most one row of a lane in flight, enforced by the database (two daemons racing
    # for one lane: the loser's claim fails here and is run again). Also "is the lane busy?".
    sa.Index("uq_outbox_messages_inflight_lane", "inflight_lane", unique=True),
    # The lease reaper: inflight rows whose lease ran out.
    sa.Index(
        "ix_outbox_messages_lease",
        "state",
        "lease_expires_at",
        postgresql_where=sa.text("state = 'inflight'"),
        sqlite_where=sa.text("state = 'inflight'"),
    ),
    # The expirer: pending rows past expires_at (migration 0007).
    sa.Index(
        "ix_outbox_messages_expiry",
        "state",
        "expires_at",
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    ),
    # Lane heads (migration 0008): rows not sorted yet (lane_behind IS NULL), and a lane's
    # first row waiting behind (lane_behind, lane): each found by a range of this index.
    sa.Index(
        "ix_outbox_messages_lane_behind",
        "lane_behind",
        "lane",
        "id",
        postgresql_where=sa.text("lane IS NOT NULL"),
        sqlite_where=sa.text("lane IS NOT NULL"),
    ),
    # Retention and `outbox list --state`: finished rows by age.
    sa.Index("ix_outbox_messages_state_updated", "state", "updated_at"),
    # The console (issue 14, migration 0011), each filter of the Rows page a range in id
    # order, and the counts of ``status`` a bounded read (``outbox.store.counts``).
    sa.Index("ix_outbox_messages_state_reason", "state", "park_reason", "id"),
    sa.Index("ix_outbox_messages_created_at", "created_at"),
    # Rows that may have executed: the open ones counted (``status``), index only.
    sa.Index(
        "ix_outbox_messages_maybe_executed",
        "maybe_executed",
        "state",
        "id",
        postgresql_where=sa.text("maybe_executed"),
        sqlite_where=sa.text("maybe_executed"),
    ),
    # Prefix searches (LIKE 'abc%'): PostgreSQL needs the pattern operators unless the
    # database's collation is "C"; elsewhere a plain index serves (and, for the key, repeats
    # the unique one: the migration test compares one schema on every database).
    sa.Index(
        "ix_outbox_messages_reference",
        "reference",
        postgresql_ops={"reference": "varchar_pattern_ops"},
    ),
    sa.Index(
        "ix_outbox_messages_key_prefix",
        "idempotency_key",
        postgresql_ops={"idempotency_key": "varchar_pattern_ops"},
    ),
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
    # The console's chart: the lines of the last hours by decision, index only (0011).
    sa.Index("ix_outbox_attempts_at", "at", "decision"),
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
    sa.Column("gate", sa.String(32), nullable=False, server_default=GateState.OPEN.value),
    sa.Column("gate_reason", sa.Text(), nullable=True),
    sa.Column("gate_until", UTCDateTime(), nullable=True),
    sa.Column("stopped_at", UTCDateTime(), nullable=True),
    # When this worker's current gate closed; NULL while open (migration 0006).
    sa.Column("gate_since", UTCDateTime(), nullable=True),
    # gRPC paths held because Recrypt answered PERMISSION_DENIED outside maintenance (the API
    # key may not call them), comma-separated; NULL for none (migration 0006).
    sa.Column("refused_methods", sa.Text(), nullable=True),
    # The daemon's jobs that keep failing, as a JSON list of {job, since, runs, error}; NULL
    # for none (migration 0009): how ``outbox check`` in another process learns of them.
    sa.Column("failing_jobs", sa.Text(), nullable=True),
)

# A key whose row retention purged (migration 0004). Recrypt may still hold a request under the
# key, so the outbox refuses it for a new row (enqueue raises; a plain-SQL row is parked
# key_reused) until ``[retention] tombstone_days`` have passed since ``purged_at``.
tombstones = sa.Table(
    "outbox_tombstones",
    metadata,
    sa.Column("idempotency_key", sa.String(64), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=True),  # NULL: the row was never claimed
    sa.Column("final_state", sa.String(16), nullable=False),
    sa.Column("finished_at", UTCDateTime(), nullable=False),  # the row's last update
    sa.Column("purged_at", UTCDateTime(), nullable=False),
    sa.Index("ix_outbox_tombstones_purged_at", "purged_at"),
)


# One row per lane name that a serialising writer used (migration 0005): writers of a lane lock
# its row until their transaction ends (``outbox.store.lock_lane``), so a lane's ids follow
# commit order. Never deleted: a writer may be waiting on the row.
lanes = sa.Table(
    "outbox_lanes",
    metadata,
    sa.Column("lane", sa.String(255), primary_key=True),
)


# A lane or a method an operator held (migration 0010): no daemon claims its rows until an
# operator releases it (``outbox hold``, ``outbox release``). A release deletes the row.
holds = sa.Table(
    "outbox_holds",
    metadata,
    sa.Column("kind", sa.String(16), primary_key=True),  # a vocabulary.HoldKind
    sa.Column("value", sa.String(255), primary_key=True),  # the lane, or the full gRPC path
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("held_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint("kind IN ('lane', 'method')", name="kind_valid"),
)

# Dual control (migration 0010): an action that needs a second operator ([console]
# dual_control: cancelling a row that may have executed) is a request here until a different
# operator approves (the action is then done) or rejects it.
approvals = sa.Table(
    "outbox_approvals",
    metadata,
    sa.Column("id", _id_type, primary_key=True, autoincrement=True),
    sa.Column("idempotency_key", sa.String(64), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),  # a vocabulary.ApprovalAction
    sa.Column("requested_by", sa.String(255), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("requested_at", UTCDateTime(), nullable=False),
    sa.Column("decided_by", sa.String(255), nullable=True),
    sa.Column("decision", sa.String(16), nullable=True),  # NULL: open; approved | rejected
    sa.Column("decided_at", UTCDateTime(), nullable=True),
    sa.Column("note", sa.Text(), nullable=True),  # the decider's reason
    sa.Index("ix_outbox_approvals_decision", "decision", "id"),
    sa.Index("ix_outbox_approvals_idempotency_key", "idempotency_key"),
)
