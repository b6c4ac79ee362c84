"""The hot queries as each database runs them, and their plans (EXPLAIN), for tests and ops.

The claim's row selection, the "oldest due" and expired-lease gauges and ``retrying`` must
stay index reads; the EXPLAIN tests read their plans here. Imports SQLAlchemy and the store's
own modules only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from outbox.schema import messages
from outbox.store.claims import due_query
from outbox.store.views import expired_leases_query, oldest_due_query, retrying_query


def written(engine: Engine, query: sa.Select[Any] | sa.Select[int, Any]) -> str:
    """``query`` as this database runs it, its values written in (for EXPLAIN)."""
    return str(query.compile(engine, compile_kwargs={"literal_binds": True}))


def claim_sql(engine: Engine, batch: int, now: datetime) -> str:
    """The claim's row selection as this database runs it, values written in."""
    return written(engine, due_query(batch, now, ()).with_only_columns(messages.c.id))


def oldest_due_sql(engine: Engine, now: datetime) -> str:
    """The "oldest due" gauge's query (``status``), values written in."""
    return written(engine, oldest_due_query(now))


def expired_leases_sql(engine: Engine, now: datetime) -> str:
    """The expired-lease count (``status``, the gauges), values written in."""
    return written(engine, expired_leases_query(now))


def retrying_sql(engine: Engine, due_before: datetime, attempts: int) -> str:
    """``retrying``'s query (``outbox check``), values written in."""
    return written(engine, retrying_query(due_before, attempts))


def explain(engine: Engine, sql: str, *, analyze: bool) -> str:
    """The database's plan for ``sql``; ``analyze`` runs it (in a transaction rolled back):
    PostgreSQL ``EXPLAIN (ANALYZE, BUFFERS)``, MariaDB ``ANALYZE FORMAT=JSON``; SQLite gives
    ``EXPLAIN QUERY PLAN``."""
    prefix = {
        "sqlite": "EXPLAIN QUERY PLAN",
        "postgresql": "EXPLAIN (ANALYZE, BUFFERS)" if analyze else "EXPLAIN",
    }.get(engine.dialect.name, "ANALYZE FORMAT=JSON" if analyze else "EXPLAIN")
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"{prefix} {sql}").all()
        conn.rollback()
    return "\n".join(" ".join(str(part) for part in row) for row in rows)
