"""one row of a lane in flight, enforced by the database; SQLite writer columns checked at INSERT

Revision ID: 0005
Revises: 0004

Lanes, on every database:

- ``outbox_messages.inflight_lane``, generated (``CASE WHEN state = 'inflight' THEN lane END``;
  STORED, VIRTUAL on SQLite: see ``outbox.schema.InflightLane``) with a UNIQUE index: at most
  one row of a lane is in flight, whichever daemon claims it. Rows that already break that
  (two daemons raced before this version) are handed back first: the lowest id stays in
  flight, the others go back to pending as ``maybe_executed`` (resent with the same key).
- ``outbox_lanes``: one row per lane, locked by serialising writers until they commit.

SQLite only: its columns take any value and compare timestamps as text, so the writer columns
get the checks the servers' types give. Triggers refuse a ``payload`` that is not JSON
(``json_valid``; bytes too) and a ``not_before``/``expires_at`` that is not an ISO-8601 time
(numbers and epochs too), and rewrite every accepted form (``T`` or space, optional fraction,
``Z`` or ``±HH:MM``) to the text the app writes, in UTC (``YYYY-MM-DD HH:MM:SS.ffffff``), so
text order is time order. Existing rows are rewritten the same way; a row whose timestamp
cannot be understood has it cleared, and is parked ``bad_row`` if it is open, with a message
naming the column.

A later migration that rebuilds ``outbox_messages`` on SQLite (batch "recreate") loses these
triggers and must create them again (``sqlite_triggers()`` below).
"""

# ruff: noqa: S608  (the SQL is built from this file's constants: column names, fixed text)
from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

from outbox.schema import InflightLane

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPS = ("not_before", "expires_at")
ACCEPTED = (
    "write UTC as 'YYYY-MM-DD HH:MM:SS' (optionally 'T' for the space, a fraction '.ffffff', "
    "and 'Z' or a '+HH:MM'/'-HH:MM' offset, converted to UTC); numbers and epochs are refused"
)
NOT_A_TIME = "{column}: not a time SQLite can compare; " + ACCEPTED
NOT_JSON = "payload: not JSON (or bytes); write the request as a JSON object in text"
STAMP = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's SQLite DATETIME text: what the app writes


def upgrade() -> None:
    _hand_back_extra_inflight_rows_per_lane()
    op.add_column("outbox_messages", sa.Column("inflight_lane", sa.String(255), InflightLane()))
    op.create_index(
        "uq_outbox_messages_inflight_lane", "outbox_messages", ["inflight_lane"], unique=True
    )
    op.create_table(
        "outbox_lanes",
        sa.Column("lane", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("lane", name=op.f("pk_outbox_lanes")),
    )
    if op.get_bind().dialect.name == "sqlite":
        _normalise_existing_timestamps()
        for statement in sqlite_triggers():
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("outbox_lanes")
    op.drop_index("uq_outbox_messages_inflight_lane", table_name="outbox_messages")
    op.drop_column("outbox_messages", "inflight_lane")


# --------------------------------------------------------------------------- lanes


def _hand_back_extra_inflight_rows_per_lane() -> None:
    """The unique index cannot be built over two inflight rows of one lane: keep the first."""
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT id, lane FROM outbox_messages "
            "WHERE state = 'inflight' AND lane IS NOT NULL ORDER BY lane, id"
        )
    ).all()
    first: dict[str, int] = {}
    for row in rows:
        first.setdefault(row.lane, row.id)
    for row_id in {row.id for row in rows} - set(first.values()):
        bind.execute(
            sa.text(
                "UPDATE outbox_messages SET state = 'pending', maybe_executed = :yes, "
                "lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = NULL, "
                "last_message = :message WHERE id = :id"
            ),
            {
                "id": row_id,
                "yes": True,
                "message": "migration 0005: another row of its lane was in flight too; "
                "handed back, resent with the same key (safe) after it",
            },
        )


# --------------------------------------------------------------------------- SQLite


def canonical(value: str) -> str:
    """SQL: ``value`` as 'YYYY-MM-DD HH:MM:SS.ffffff' UTC text, or NULL if not accepted.

    SQLite's date functions understand the ISO forms but keep milliseconds only, so the
    fraction is carried over as text (first six digits). The wall time is checked to be a
    real one (SQLite's own parser takes 2026-02-31).
    """
    wall = f"(substr({value}, 1, 10) || ' ' || substr({value}, 12, 8))"
    rest = f"substr({value}, 20)"
    zone = (
        f"(CASE WHEN {rest} GLOB '*Z' THEN 'Z' "
        f"WHEN substr({rest}, -6) GLOB '[+-][0-9][0-9]:[0-9][0-9]' THEN substr({rest}, -6) "
        "ELSE '' END)"
    )
    fraction = f"substr({rest}, 1, length({rest}) - length({zone}))"
    digits = f"substr({fraction}, 2)"
    shape = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9][ T][0-9][0-9]:[0-9][0-9]:[0-9][0-9]"
    accepted = " AND ".join(
        [
            f"typeof({value}) = 'text'",
            f"substr({value}, 1, 19) GLOB '{shape}'",
            f"({fraction} = '' OR ({fraction} GLOB '.[0-9]*' AND {digits} NOT GLOB '*[^0-9]*'))",
            f"datetime({wall}, '+0 seconds') = {wall}",
        ]
    )
    utc = f"datetime({wall} || {zone})"
    return f"(CASE WHEN {accepted} THEN {utc} || '.' || substr({digits} || '000000', 1, 6) END)"


def _refuse(condition: str, message: str) -> str:
    return f"SELECT RAISE(ABORT, '{message.replace(chr(39), chr(39) * 2)}') WHERE {condition};"


def _guards(changed: str) -> str:
    """The trigger body refusing bad writer columns; ``changed`` formats 'is NEW.x new?'."""
    # Bytes are refused as the servers refuse them; a number SQLite's column affinity made of
    # the text '0' is valid JSON (parked by the daemon, as a jsonb 0 would be).
    not_json = "typeof(NEW.payload) = 'blob' OR NOT json_valid(NEW.payload)"
    checks = [_refuse(f"{changed.format('payload')} AND ({not_json})", NOT_JSON)]
    for column in TIMESTAMPS:
        bad = f"{changed.format(column)} AND {canonical(f'NEW.{column}')} IS NULL"
        checks.append(_refuse(bad, NOT_A_TIME.format(column=column)))
    return "\n".join(checks)


def _normalised(prefix: str) -> tuple[str, str]:
    """(WHEN: a timestamp is not in the app's form, SET: rewrite both to it)."""
    fixed = {c: f"coalesce({canonical(prefix + c)}, {prefix + c})" for c in TIMESTAMPS}
    when = " OR ".join(f"{prefix}{c} IS NOT {fixed[c]}" for c in TIMESTAMPS)
    bare = {c: f"coalesce({canonical(c)}, {c})" for c in TIMESTAMPS}
    return when, ", ".join(f"{c} = {bare[c]}" for c in TIMESTAMPS)


TRIGGERS = (
    "outbox_messages_guard_insert",
    "outbox_messages_guard_update",
    "outbox_messages_normalise_insert",
    "outbox_messages_normalise_update",
)


def sqlite_triggers() -> list[str]:
    """CREATE TRIGGER statements: refuse, then rewrite to the app's text (INSERT and UPDATE)."""
    when, rewrite = _normalised("NEW.")
    fix = f"UPDATE outbox_messages SET {rewrite} WHERE id = NEW.id;"
    on_update = "UPDATE OF payload, not_before, expires_at"
    return [
        f"CREATE TRIGGER {TRIGGERS[0]} BEFORE INSERT ON outbox_messages BEGIN\n"
        f"{_guards('NEW.{0} IS NOT NULL')}\nEND",
        f"CREATE TRIGGER {TRIGGERS[1]} BEFORE {on_update} ON outbox_messages BEGIN\n"
        f"{_guards('NEW.{0} IS NOT NULL AND NEW.{0} IS NOT OLD.{0}')}\nEND",
        f"CREATE TRIGGER {TRIGGERS[2]} AFTER INSERT ON outbox_messages WHEN {when} BEGIN\n"
        f"{fix}\nEND",
        f"CREATE TRIGGER {TRIGGERS[3]} AFTER UPDATE OF not_before, expires_at "
        f"ON outbox_messages WHEN {when} BEGIN\n{fix}\nEND",
    ]


def _normalise_existing_timestamps() -> None:
    """Rewrite old rows to the app's text; clear (and park) what cannot be understood."""
    bind = op.get_bind()
    for column in TIMESTAMPS:
        bind.execute(
            sa.text(
                f"UPDATE outbox_messages SET {column} = {canonical(column)} "
                f"WHERE {canonical(column)} IS NOT NULL AND {column} IS NOT {canonical(column)}"
            )
        )
    unreadable = " OR ".join(f"({c} IS NOT NULL AND {canonical(c)} IS NULL)" for c in TIMESTAMPS)
    rows = bind.execute(
        sa.text(f"SELECT id, state, not_before, expires_at FROM outbox_messages WHERE {unreadable}")
    ).all()
    now = datetime.now(UTC).strftime(STAMP)
    for row in rows:
        _clear_unreadable(bind, row, now)


def _clear_unreadable(bind: sa.Connection, row: Any, now: str) -> None:
    """Clear a row's unreadable timestamps; an open row is parked ``bad_row`` and told why."""
    bad = [c for c in TIMESTAMPS if _unreadable(bind, getattr(row, c))]
    was = "; ".join(f"{c} was {getattr(row, c)!r:.60}" for c in bad)
    cleared = ", ".join(f"{c} = NULL" for c in bad)
    if row.state in ("committed", "cancelled", "expired"):
        note = f"migration 0005 cleared timestamps SQLite cannot compare: {was}"
        bind.execute(
            sa.text(
                f"UPDATE outbox_messages SET {cleared}, last_message = "
                "coalesce(last_message || ' | ', '') || :note WHERE id = :id"
            ),
            {"note": note, "id": row.id},
        )
        return
    message = (
        f"{was}: not a time SQLite can compare, so migration 0005 cleared it and parked the "
        f"row; set it again ({ACCEPTED}) or leave it NULL, then requeue; or cancel"
    )
    bind.execute(
        sa.text(
            f"UPDATE outbox_messages SET {cleared}, state = 'parked', park_reason = 'bad_row', "
            "maybe_executed = (maybe_executed OR state = 'inflight'), lease_owner = NULL, "
            "lease_expires_at = NULL, next_attempt_at = NULL, last_message = :message, "
            "updated_at = :now WHERE id = :id"
        ),
        {"message": message, "now": now, "id": row.id},
    )
    bind.execute(
        sa.text(
            "INSERT INTO outbox_attempts (message_id, at, kind, actor, message, decision) "
            "VALUES (:id, :now, 'system', 'migration 0005', :message, 'parked')"
        ),
        {"message": message, "now": now, "id": row.id},
    )


def _unreadable(bind: sa.Connection, value: object) -> bool:
    if value is None:
        return False
    found = bind.execute(sa.text(f"SELECT {canonical(':v')} IS NULL"), {"v": value}).scalar()
    return bool(found)
