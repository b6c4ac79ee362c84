"""The Alembic history and ``outbox/schema.py`` describe the same schema, on every backend."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine

from outbox import migrate
from outbox.database import make_engine
from outbox.errors import SchemaNotReadyError
from outbox.schema import messages, metadata, workers

REPO = Path(__file__).resolve().parents[2]
OUTBOX_TABLES = {"outbox_messages", "outbox_attempts", "outbox_workers"}


@pytest.fixture
def empty_engine(backend: str, fresh_empty_url: Callable[[str], str]) -> Iterator[Engine]:
    engine = make_engine(fresh_empty_url(backend))
    yield engine
    engine.dispose()


def schema_diff(engine: Engine) -> list[Any]:
    """What autogenerate would change to make the database match the metadata."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


def where_clause(options: dict[str, Any]) -> str:
    """A reflected index's WHERE (text on PostgreSQL, a TextClause on SQLite), or ""."""
    where = options.get("postgresql_where", options.get("sqlite_where"))
    return "" if where is None else str(where)


def table_names(engine: Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_matches_metadata_and_downgrade_drops_everything(empty_engine: Engine) -> None:
    migrate.upgrade(empty_engine)
    assert table_names(empty_engine) >= OUTBOX_TABLES
    assert schema_diff(empty_engine) == []
    assert migrate.current(empty_engine) == migrate.head() == "0012"

    migrate.downgrade(empty_engine, "base")
    assert table_names(empty_engine) & OUTBOX_TABLES == set()
    assert migrate.current(empty_engine) is None

    migrate.upgrade(empty_engine)
    migrate.ensure_at_head(empty_engine)
    assert schema_diff(empty_engine) == []


def test_migration_0006_keeps_the_workers_and_reads_them_as_since_unknown(
    empty_engine: Engine,
) -> None:
    """0006 only adds nullable columns: a worker that beat before it stays, its new columns
    NULL; a downgrade drops them and keeps the worker."""
    migrate.upgrade(empty_engine, "0005")
    with empty_engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO outbox_workers (worker_id, host, pid, version, started_at, "
                "last_beat_at, gate) VALUES ('w-old', 'h', 1, '0.0.9', :at, :at, 'rollover')"
            ),
            {"at": "2026-11-24 18:01:00"},
        )
    migrate.upgrade(empty_engine)
    with empty_engine.connect() as connection:
        row = connection.execute(sa.select(workers)).one()
    assert (row.worker_id, row.gate, row.gate_since, row.refused_methods) == (
        "w-old",
        "rollover",
        None,
        None,
    )

    migrate.downgrade(empty_engine, "0005")
    columns = {c["name"] for c in sa.inspect(empty_engine).get_columns("outbox_workers")}
    assert {"gate_since", "refused_methods"} & columns == set()
    with empty_engine.connect() as connection:
        kept = connection.execute(sa.text("SELECT worker_id FROM outbox_workers")).scalars()
        assert list(kept) == ["w-old"]


def test_the_comparison_notices_a_missing_index(engine: Engine) -> None:
    """Proof that ``schema_diff`` really looks at the database (an empty diff means something)."""
    with engine.begin() as connection:
        connection.execute(
            sa.text("DROP INDEX ix_outbox_messages_state_updated ON outbox_messages")
            if connection.dialect.name in ("mysql", "mariadb")
            else sa.text("DROP INDEX ix_outbox_messages_state_updated")
        )
    diff = schema_diff(engine)
    assert [(d[0], d[1].name) for d in diff] == [("add_index", "ix_outbox_messages_state_updated")]


def test_the_claim_indexes_are_partial_where_the_database_can(engine: Engine) -> None:
    """Autogenerate does not compare index WHERE clauses, so check them here.

    PostgreSQL and SQLite get partial indexes; MariaDB/MySQL have none and get plain ones.
    """
    where_by_index = {
        index["name"]: where_clause(index.get("dialect_options", {}))
        for index in sa.inspect(engine).get_indexes("outbox_messages")
    }
    if engine.dialect.name in ("mysql", "mariadb"):
        assert set(where_by_index.values()) == {""}
        return
    assert "due_at IS NOT NULL" in where_by_index["ix_outbox_messages_due"]
    assert "pending" in where_by_index["ix_outbox_messages_expiry"]
    assert "inflight" in where_by_index["ix_outbox_messages_lease"]
    assert "lane IS NOT NULL" in where_by_index["ix_outbox_messages_lane_open"]
    assert where_by_index["ix_outbox_messages_state_updated"] == ""


def test_ensure_at_head_refuses_an_empty_database(empty_engine: Engine) -> None:
    with pytest.raises(SchemaNotReadyError, match=r"none .* needs 0012: run `outbox db upgrade`"):
        migrate.ensure_at_head(empty_engine)


def test_ensure_at_head_accepts_a_fresh_database(engine: Engine) -> None:
    migrate.ensure_at_head(engine)


def test_a_writer_needs_only_the_three_contract_columns(engine: Engine) -> None:
    """SPEC §3: the minimal plain-SQL INSERT works on every backend; the rest are defaults."""
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO outbox_messages (idempotency_key, method, payload) VALUES "
                "('6f1c2a9e-8d4b-4c1e-9a7f-0b3d5e6f7a8b', '/recrypt.wallet.v1.Wallet/Transfer', "
                """'{"fromAccount": "A-1", "toAccount": "B-2", "amount": "10.00"}')"""
            )
        )
    with engine.connect() as connection:
        row = connection.execute(sa.select(messages)).one()
    assert row.state == "pending"
    assert row.attempts == 0
    assert row.maybe_executed is False
    assert row.created_at is not None
    assert row.created_at.tzinfo is not None
    assert row.payload == {"fromAccount": "A-1", "toAccount": "B-2", "amount": "10.00"}
    assert row.next_attempt_at is None  # NULL is "due now"


def test_in_memory_sqlite_is_migrated_on_the_callers_connection() -> None:
    """Migrations run on the engine's own connection: an in-memory database keeps its tables."""
    engine = make_engine("sqlite://")
    try:
        migrate.upgrade(engine)
        migrate.ensure_at_head(engine)
        assert table_names(engine) >= OUTBOX_TABLES
    finally:
        engine.dispose()


@pytest.mark.slow
def test_the_wheel_ships_migrations_and_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
        check=True,
        timeout=110,
    )
    (wheel,) = tmp_path.glob("recrypt_outbox-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "outbox/_migrations/env.py",
        "outbox/_migrations/script.py.mako",
        "outbox/_migrations/versions/0001_initial.py",
        "outbox/_protos/recrypt/wallet/v1/wallet.proto",
    } <= names


def test_postgres_insert_trigger_notifies_once_per_transaction(postgres_url) -> None:
    """Migration 0002: writers wake the daemon through LISTEN/NOTIFY, once per transaction."""
    import psycopg

    from outbox.database import normalise_url

    conninfo = normalise_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(conninfo, autocommit=True) as listener:
        listener.execute("LISTEN outbox_messages")
        with psycopg.connect(conninfo) as writer, writer.transaction():
            for i in range(50):
                writer.execute(
                    "INSERT INTO outbox_messages (idempotency_key, method, payload) "
                    "VALUES (%s, '/x.v1.S/M', '{}')",
                    (f"00000000-0000-0000-0000-{i:012d}",),
                )
        received = list(listener.notifies(timeout=2.0))
    assert len(received) == 1
    assert received[0].channel == "outbox_messages"


def test_migration_0007_fills_due_at_for_existing_rows(empty_engine: Engine) -> None:
    """0007 adds ``due_at``, generated: rows written before it get theirs (the later of
    ``not_before`` and ``next_attempt_at``, else "due now"), and it follows later updates."""
    migrate.upgrade(empty_engine, "0006")
    insert = sa.text(
        "INSERT INTO outbox_messages (idempotency_key, method, payload, not_before, "
        "next_attempt_at) VALUES (:key, '/x.v1.S/M', '{}', :nb, :nat)"
    )
    early, late = "2026-11-24 18:01:00.000000", "2026-11-25 07:30:00.500000"
    with empty_engine.begin() as connection:
        for key, nb, nat in (("a", None, None), ("b", late, early), ("c", early, late)):
            connection.execute(insert, {"key": key, "nb": nb, "nat": nat})
        connection.execute(insert, {"key": "d", "nb": early, "nat": None})
    migrate.upgrade(empty_engine)
    due = {
        row.idempotency_key: row.due_at
        for row in _read(empty_engine, sa.select(messages.c.idempotency_key, messages.c.due_at))
    }
    stamp = {t: datetime.fromisoformat(t).replace(tzinfo=UTC) for t in (early, late)}
    assert due == {
        "a": datetime(1970, 1, 1, tzinfo=UTC),
        "b": stamp[late],
        "c": stamp[late],
        "d": stamp[early],
    }
    with empty_engine.begin() as connection:
        connection.execute(
            messages.update()
            .where(messages.c.idempotency_key == "a")
            .values(next_attempt_at=stamp[early])
        )
    assert _read(
        empty_engine, sa.select(messages.c.due_at).where(messages.c.idempotency_key == "a")
    ) == [(stamp[early],)]
    migrate.downgrade(empty_engine, "0006")
    columns = {c["name"] for c in sa.inspect(empty_engine).get_columns("outbox_messages")}
    assert "due_at" not in columns


def _read(engine: Engine, query: sa.Select[Any]) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(query).all())
