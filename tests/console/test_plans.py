"""The console's queries read indexes, never the whole table (issue 14: 200 ms on 2,000,000).

A module-scoped database per server holds 20,000 rows filled as ``bench.console`` fills its
2,000,000 (the same mix: committed, pending, parked by every reason, history), ANALYZEd. Each
query's plan must name the index that serves it: PostgreSQL's ``EXPLAIN`` (the outbox's own
engine, ``enable_seqscan`` off as in production, so an index that cannot serve shows as a
``Seq Scan``), MariaDB's ``EXPLAIN FORMAT=JSON`` (no ``ALL`` or full-``index`` access).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bench.console import analyze, fill_history, fill_messages
from outbox.database import make_engine
from outbox.store import plans
from outbox.store.console_views import RowFilter, activity_query, find_rows_query
from outbox.store.counts import counts_query, state_counts
from outbox.store.views import maybe_executed_open_query, view_query
from tests.conftest import _create_database, _drop_database, _migrate, require_server

ROWS = 20_000


@pytest.fixture(scope="module", params=["postgresql", "mariadb"])
def filled(request: pytest.FixtureRequest) -> Iterator[Engine]:
    backend = str(request.param)
    require_server(backend)
    name = f"outbox_test_{uuid.uuid4().hex[:8]}"
    url = _create_database(backend, name)
    try:
        _migrate(url)
        engine = make_engine(url)
        fill_messages(engine, ROWS, 168.0)
        fill_history(engine)
        analyze(engine)
        yield engine
        engine.dispose()
    finally:
        _drop_database(backend, name)


def _plan(engine: Engine, query: sa.Select[Any]) -> str:
    sql = plans.written(engine, query)
    if engine.dialect.name == "postgresql":
        return plans.explain(engine, sql, analyze=False)
    with engine.connect() as conn:
        return str(conn.exec_driver_sql(f"EXPLAIN FORMAT=JSON {sql}").scalar_one())


def _tables(node: Any) -> Iterator[dict[str, Any]]:
    """Every ``table`` entry of a MariaDB JSON plan."""
    if isinstance(node, dict):
        if str(node.get("table_name", "")).startswith("outbox_"):
            yield node
        for value in node.values():
            yield from _tables(value)
    elif isinstance(node, list):
        for value in node:
            yield from _tables(value)


def assert_reads(engine: Engine, query: sa.Select[Any], *indexes: str) -> None:
    """The plan reads one of ``indexes`` and scans no table of the outbox."""
    plan = _plan(engine, query)
    if engine.dialect.name == "postgresql":
        assert "Seq Scan" not in plan, plan
        assert any(f"using {index}" in plan for index in indexes), plan
        return
    tables = list(_tables(json.loads(plan)))
    assert all(t["access_type"] not in ("ALL", "index") for t in tables), plan
    assert set(indexes) & {t.get("key") for t in tables}, plan


def rows_query(**wanted: Any) -> sa.Select[Any]:
    return find_rows_query(view_query(with_payload=False), RowFilter(**wanted), 50)


def _sample(engine: Engine) -> tuple[str, datetime]:
    """A parked row's key, and the time of a row a day old."""
    with engine.connect() as conn:
        key = conn.exec_driver_sql(
            "SELECT min(idempotency_key) FROM outbox_messages WHERE state = 'parked'"
        ).scalar_one()
        day_ago = conn.exec_driver_sql(
            f"SELECT created_at FROM outbox_messages WHERE id = {ROWS - ROWS // 7}"
        ).scalar_one()
    return key, day_ago.replace(tzinfo=UTC)


def test_the_counts_per_state_read_a_bounded_range_of_a_state_index(filled: Engine) -> None:
    """Any index led by ``state`` serves (the planner picks the smaller), each range cut
    at the limit; PostgreSQL reads the index only."""
    names = (
        "ix_outbox_messages_state_reason",
        "ix_outbox_messages_state_updated",
        "ix_outbox_messages_lease",  # partial on in-flight rows, but not on MariaDB
        "ix_outbox_messages_expiry",
    )
    assert_reads(filled, counts_query(), *names)
    if filled.dialect.name == "postgresql":
        plan = _plan(filled, counts_query())
        assert plan.count("Limit") == plan.count("Aggregate") == 6, plan
        assert "Index Scan" not in plan, plan  # every range: Index Only Scan


def test_a_count_over_the_limit_is_an_estimate_and_says_so(filled: Engine) -> None:
    with filled.connect() as conn:
        counts, estimated = state_counts(conn, limit=1_000)
        exact = dict(
            conn.exec_driver_sql("SELECT state, count(*) FROM outbox_messages GROUP BY state").all()
        )
    assert estimated == {"committed"}
    assert counts["committed"] > 1_000  # never less than the rows counted
    if filled.dialect.name == "postgresql":  # MariaDB's (InnoDB's) estimate is rougher
        assert abs(counts["committed"] - exact["committed"]) < exact["committed"] * 0.25
    assert {s: n for s, n in counts.items() if s != "committed"} == {
        s: exact.get(s, 0) for s in counts if s != "committed"
    }


def test_the_chart_reads_the_history_by_time(filled: Engine) -> None:
    start = datetime.now(UTC) - timedelta(hours=3)
    assert_reads(filled, activity_query(filled.dialect.name, start), "ix_outbox_attempts_at")


def test_parked_rows_by_reason_are_a_range_of_the_state_index(filled: Engine) -> None:
    query = rows_query(state="parked", park_reason="precondition")
    assert_reads(filled, query, "ix_outbox_messages_state_reason")


def test_a_reference_prefix_is_a_range_of_its_index(filled: Engine) -> None:
    assert_reads(filled, rows_query(reference="inv-1234"), "ix_outbox_messages_reference")


def test_a_key_prefix_is_a_range_of_an_index(filled: Engine) -> None:
    key, _ = _sample(filled)
    # MariaDB: the unique index serves LIKE 'abc%' as well
    names = ("ix_outbox_messages_key_prefix", "uq_outbox_messages_idempotency_key")
    if filled.dialect.name == "postgresql":
        names = names[:1]
    assert_reads(filled, rows_query(key_prefix=key[:4]), *names)


def test_a_time_range_is_a_range_of_the_creation_index(filled: Engine) -> None:
    _, day_ago = _sample(filled)
    query = rows_query(since=day_ago, until=day_ago + timedelta(hours=1))
    assert_reads(filled, query, "ix_outbox_messages_created_at")


def test_the_open_rows_that_may_have_executed_are_counted_from_their_index(
    filled: Engine,
) -> None:
    index = "ix_outbox_messages_maybe_executed"
    assert_reads(filled, maybe_executed_open_query(), index)
