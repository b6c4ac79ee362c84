"""The reconciliation benchmark: ``outbox report`` over a table of finished rows.

``python -m bench.report --rows 2000000`` (re)creates the database (PostgreSQL by default),
fills it with one ``INSERT … SELECT generate_series`` (transfers and orders, every reported
state, a tenth of the parked and cancelled ones in doubt, spread over 30 days), then times
``build_report`` (the store's streamed read plus the aggregation, as the command runs them)
over the whole range and over one day, and prints each plan, rows/s and seconds.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from bench.__main__ import fresh_database, shown
from outbox.descriptors import Catalog
from outbox.report import build_report
from outbox.simulator import PLACE_ORDER, TRANSFER
from outbox.store import Store

START = datetime(2030, 1, 1, tzinfo=UTC)
DAYS = 30
#: Row i: a transfer (two in three) or an order; its state by i mod 10; in doubt when parked or
#: cancelled and i mod 7 = 0; finished at START + i * (30 days / n).
FILL = """
INSERT INTO outbox_messages (idempotency_key, method, payload, state, attempts,
                             maybe_executed, committed_at, updated_at)
SELECT gen_random_uuid()::text,
       CASE WHEN mod(i, 3) = 2 THEN '{order}' ELSE '{transfer}' END,
       CASE WHEN mod(i, 3) = 2
            THEN jsonb_build_object('account', 'a', 'market', 'BTC-AUD',
                                    'quantity', ((mod(i, 1000)) / 1000.0)::text)
            ELSE jsonb_build_object('fromAccount', 'a', 'toAccount', 'b',
                                    'amount', ((mod(i, 100000)) / 100.0)::text,
                                    'currency', CASE WHEN mod(i, 3) = 0 THEN 'AUD' ELSE 'BTC' END)
       END,
       s.state, 1,
       s.state IN ('parked', 'cancelled') AND mod(i, 7) = 0,
       CASE WHEN s.state = 'committed' THEN t END, t
FROM generate_series(1, {n}) AS i,
     LATERAL (SELECT (ARRAY['committed','committed','committed','committed','committed',
                            'committed','parked','expired','cancelled','committed'])[mod(i, 10) + 1]
                     AS state,
                     '{start}'::timestamptz + (i * interval '{step} microseconds') AS t) AS s
"""


def fill(engine: sa.Engine, n: int) -> float:
    step = int(DAYS * 86400 * 1e6 / n)
    sql = FILL.format(order=PLACE_ORDER, transfer=TRANSFER, n=n, start=START.isoformat(), step=step)
    began = time.perf_counter()
    with engine.begin() as conn:
        conn.exec_driver_sql(sql)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE outbox_messages")
    return time.perf_counter() - began


def timed(store: Store, since: datetime, until: datetime, title: str) -> None:
    fields = Catalog.load().report_fields()
    print(f"-- {title}: plan\n{store.explain_finished_rows(since, until)}")
    began = time.perf_counter()
    made = build_report(store, since, until, fields)
    seconds = time.perf_counter() - began
    rows = sum(line.rows for line in made.lines)
    print(
        f"{title}: {rows} rows in {seconds:.2f} s = {rows / seconds:,.0f} rows/s, "
        f"{len(made.lines)} lines",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/outbox_bench_report")
    parser.add_argument("--rows", type=int, default=2_000_000)
    args = parser.parse_args()
    engine = fresh_database(args.url)
    print(f"database {shown(args.url)}: filling {args.rows} rows", flush=True)
    print(f"filled in {fill(engine, args.rows):.1f} s", flush=True)
    store = Store(engine)
    timed(store, START, START + timedelta(days=DAYS + 1), "whole range (30 days)")
    timed(store, START + timedelta(days=3), START + timedelta(days=4), "one day")
    print(f"reproduce: .venv/bin/python -m bench.report --url {args.url} --rows {args.rows}")


if __name__ == "__main__":
    main()
