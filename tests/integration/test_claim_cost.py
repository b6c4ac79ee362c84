"""A claim reads O(batch) rows, whatever else waits (issue #11).

Built once per module and backend, each in its own database followed by 200 due rows:
200,000 lane-less rows scheduled for tomorrow (``not_before``); or those and 200,000 rows of
one lane behind its parked head (sorted as waiting: ``outbox.store.heads``) and ten lanes
whose first rows are due heads, so the claim asks its lane probes of rows far into the
table. The
claim's row selection is then measured by the database itself: PostgreSQL's
``EXPLAIN (ANALYZE, BUFFERS)`` (shared buffers touched, rows removed by a filter), MariaDB's
``Handler_read%`` session counters (index and table rows read).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from outbox.database import make_engine
from outbox.store import Store
from tests.conftest import _create_database, _drop_database, _migrate, require_server

SCHEDULED = 200_000
BLOCKED = 200_000
DUE = 200
BATCH = 64
#: What a claim of 64 may read: its rows, their index entries, the lane and tombstone probes.
#: The claim before issue #11 read every pending row (400,000+; tens of thousands of buffers).
MAX_BUFFERS = 2_000
MAX_HANDLER_READS = 3_000
DUE_ROWS = {
    "postgresql": "INSERT INTO outbox_messages (idempotency_key, method, payload) "
    f"SELECT gen_random_uuid()::text, '/x.v1.S/M', '{{}}'::jsonb FROM generate_series(1, {DUE})",
    "mariadb": "INSERT INTO outbox_messages (idempotency_key, method, payload) "
    f"SELECT uuid(), '/x.v1.S/M', '{{}}' FROM seq_1_to_{DUE}",
}
SCHEDULED_ROWS = {  # lane-less, not before tomorrow
    "postgresql": "INSERT INTO outbox_messages (idempotency_key, method, payload, not_before) "
    "SELECT gen_random_uuid()::text, '/x.v1.S/M', '{}'::jsonb, now() + interval '1 day' "
    f"FROM generate_series(1, {SCHEDULED})",
    "mariadb": "INSERT INTO outbox_messages (idempotency_key, method, payload, not_before) "
    "SELECT uuid(), '/x.v1.S/M', '{}', UTC_TIMESTAMP(6) + INTERVAL 1 DAY "
    f"FROM seq_1_to_{SCHEDULED}",
}
LANED_DUE_ROWS = {  # ten lanes of 20 rows, each lane's first row a due head
    "postgresql": "INSERT INTO outbox_messages (idempotency_key, method, payload, lane) "
    "SELECT gen_random_uuid()::text, '/x.v1.S/M', '{}'::jsonb, 'due-' || mod(i, 10) "
    f"FROM generate_series(1, {DUE}) AS i",
    "mariadb": "INSERT INTO outbox_messages (idempotency_key, method, payload, lane) "
    f"SELECT uuid(), '/x.v1.S/M', '{{}}', concat('due-', mod(seq, 10)) FROM seq_1_to_{DUE}",
}
PARKED_HEAD = (  # the head of lane 'stuck', parked
    "INSERT INTO outbox_messages (idempotency_key, method, payload, lane, state, park_reason) "
    "VALUES ({key}, '/x.v1.S/M', '{{}}', 'stuck', 'parked', 'rejected')"
)
BLOCKED_ROWS = {  # behind it
    "postgresql": "INSERT INTO outbox_messages (idempotency_key, method, payload, lane) "
    "SELECT gen_random_uuid()::text, '/x.v1.S/M', '{}'::jsonb, 'stuck' "
    f"FROM generate_series(1, {BLOCKED})",
    "mariadb": "INSERT INTO outbox_messages (idempotency_key, method, payload, lane) "
    f"SELECT uuid(), '/x.v1.S/M', '{{}}', 'stuck' FROM seq_1_to_{BLOCKED}",
}
KEY = {"postgresql": "gen_random_uuid()::text", "mariadb": "uuid()"}
ANALYZE_MARIADB = "ANALYZE TABLE outbox_messages"
VACUUM = {
    "postgresql": "VACUUM ANALYZE outbox_messages",
    "mariadb": "ANALYZE TABLE outbox_messages",
}
ANALYZE = {"postgresql": "ANALYZE outbox_messages", "mariadb": ANALYZE_MARIADB}


def _fill(backend: str, kind: str) -> list[str]:
    """Scheduled rows; for "both", also a parked lane head, the rows behind it and ten lanes
    whose heads are due (each head's lane probes run); then the due rows."""
    backlog = [SCHEDULED_ROWS[backend]]
    if kind == "both":
        blocked = [PARKED_HEAD.format(key=KEY[backend]), BLOCKED_ROWS[backend]]
        backlog += [*blocked, LANED_DUE_ROWS[backend]]
    return [*backlog, DUE_ROWS[backend], ANALYZE[backend]]


@dataclass
class Backlog:
    kind: str  # "scheduled", or "both": scheduled and lane-blocked rows
    engine: Engine


def _backlog(backend: str, kind: str) -> Iterator[Engine]:
    require_server(backend)
    name = f"outbox_test_{uuid.uuid4().hex[:8]}"
    url = _create_database(backend, name)
    try:
        _migrate(url)
        engine = make_engine(url)
        with engine.begin() as conn:
            for statement in _fill(backend, kind):
                conn.exec_driver_sql(statement)
        store = Store(engine)  # as the claims of a running daemon do, a bounded number each
        while store.sort_lanes():
            pass
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(VACUUM[backend])  # as autovacuum does after a large update
        yield engine
        engine.dispose()
    finally:
        _drop_database(backend, name)


@pytest.fixture(scope="module", params=["scheduled", "both"])
def postgres_backlog(request: pytest.FixtureRequest) -> Iterator[Backlog]:
    for engine in _backlog("postgresql", request.param):
        yield Backlog(request.param, engine)


@pytest.fixture(scope="module", params=["scheduled", "both"])
def mariadb_backlog(request: pytest.FixtureRequest) -> Iterator[Backlog]:
    for engine in _backlog("mariadb", request.param):
        yield Backlog(request.param, engine)


def _buffers(plan: str) -> int:
    """Shared buffers touched by the whole statement (the top node's line counts them all)."""
    found = re.search(r"Buffers: shared ((?:\w+=\d+ ?)+)", plan)
    assert found, plan
    return sum(int(n) for n in re.findall(r"=(\d+)", found.group(1)))


def test_postgres_claim_touches_o_batch_rows(
    postgres_backlog: Backlog,
) -> None:
    store = Store(postgres_backlog.engine)
    plan = store.explain_claim(BATCH, datetime.now(UTC), analyze=True)
    removed = sum(int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", plan))
    assert f"rows={BATCH} " in plan.splitlines()[0] or f"rows={BATCH})" in plan, plan
    assert removed < BATCH * 4, plan
    assert _buffers(plan) < MAX_BUFFERS, plan
    assert len(store.claim_due("w", BATCH, 60.0, datetime.now(UTC))) == BATCH


def test_postgres_oldest_due_gauge_reads_an_index(postgres_backlog: Backlog) -> None:
    plan = Store(postgres_backlog.engine).explain_oldest_due(datetime.now(UTC), analyze=True)
    assert "Seq Scan" not in plan, plan
    assert _buffers(plan) < MAX_BUFFERS, plan


def _handler_reads(engine: Engine, sql: str) -> int:
    """Index and table rows the statement read, from MariaDB's session counters."""
    counters = "SHOW SESSION STATUS LIKE 'Handler_read%%'"
    with engine.connect() as conn:
        before = dict(conn.exec_driver_sql(counters).all())
        conn.exec_driver_sql(sql).all()
        after = dict(conn.exec_driver_sql(counters).all())
        conn.rollback()
    return sum(int(after[k]) - int(before[k]) for k in after)


def test_mariadb_claim_reads_o_batch_rows(
    mariadb_backlog: Backlog,
) -> None:
    store = Store(mariadb_backlog.engine)
    now = datetime.now(UTC)
    reads = _handler_reads(mariadb_backlog.engine, store.claim_sql(BATCH, now))
    analyzed = json.loads(store.explain_claim(BATCH, now, analyze=True))
    assert reads < MAX_HANDLER_READS, (reads, json.dumps(analyzed, indent=1))
    assert len(store.claim_due("w", BATCH, 60.0, now)) == BATCH


def test_mariadb_oldest_due_gauge_reads_an_index(mariadb_backlog: Backlog) -> None:
    store = Store(mariadb_backlog.engine)
    reads = _handler_reads(mariadb_backlog.engine, store.oldest_due_sql(datetime.now(UTC)))
    assert reads < MAX_HANDLER_READS, reads


def test_sqlite_claim_searches_the_due_index(sqlite_url: str) -> None:
    """SQLite: no rows needed to see the plan: a range on the due index, no sort, no scan."""
    engine = make_engine(sqlite_url)
    try:
        plan = Store(engine).explain_claim(BATCH, datetime.now(UTC))
    finally:
        engine.dispose()
    main = [line for line in plan.splitlines() if "outbox_messages" in line and "AS" not in line]
    assert any("ix_outbox_messages_due" in line and "due_at<" in line for line in main), plan
    assert "SCAN outbox_messages" not in plan, plan
    assert "TEMP B-TREE" not in plan, plan


def test_mariadb_uses_the_sequence_engine(mariadb_backlog: Backlog) -> None:
    """The fill above relies on MariaDB's built-in ``seq_1_to_N`` tables."""
    with mariadb_backlog.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM seq_1_to_10")).scalar_one() == 10
