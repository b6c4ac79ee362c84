"""The claim stays an index walk over due rows, however many finished rows accumulate."""

from __future__ import annotations

from datetime import UTC, datetime

from outbox.database import make_engine
from outbox.store import Store

FINISHED = 200_000


def test_claim_does_not_scan_finished_rows(postgres_url) -> None:
    engine = make_engine(postgres_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO outbox_messages (idempotency_key, method, payload, state, attempts, "
            "committed_at, updated_at) SELECT gen_random_uuid()::text, '/x.v1.S/M', '{}'::jsonb, "
            f"'committed', 1, now(), now() FROM generate_series(1, {FINISHED})"
        )
        conn.exec_driver_sql(
            "INSERT INTO outbox_messages (idempotency_key, method, payload, lane) "
            "SELECT gen_random_uuid()::text, '/x.v1.S/M', '{}'::jsonb, "
            "CASE WHEN mod(i, 2) = 0 THEN 'lane-' || mod(i, 7) END FROM generate_series(1, 500) i"
        )
        conn.exec_driver_sql("ANALYZE outbox_messages")
    plan = Store(engine).explain_claim(64, datetime.now(UTC))
    engine.dispose()
    assert "Seq Scan on outbox_messages" not in plan, plan
    assert "ix_outbox_messages_due" in plan, plan
