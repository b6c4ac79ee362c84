"""``outbox demo``: the whole path on one machine — SQLite, the simulator, the real daemon.

It enqueues a few transfers and orders (one through a plain SQL INSERT, one over the
transaction limit, one whose first call executes but answers ``UNAVAILABLE vgw-db``), runs the
daemon until nothing is due, and prints the state table with what an operator would do next.

It must not import ``outbox.cli`` (the CLI imports it): the ``outbox demo`` command hands it
the CLI's row table as ``show_rows``.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path

import grpc
import sqlalchemy as sa
from rich.console import Console

import outbox
from outbox.clock import utcnow
from outbox.config import Config, load
from outbox.daemon import Daemon
from outbox.database import make_engine
from outbox.errors import OutboxError
from outbox.logs import setup
from outbox.migrate import upgrade
from outbox.simulator import PLACE_ORDER, TRANSFER, Fault, Simulator
from outbox.store import RowView, Store

#: Draws rows on a console: ``outbox list``'s table (``outbox.cli.render.print_rows``).
ShowRows = Callable[[Console, Sequence[RowView]], None]

DEMO_KEY = "demo-api-key"
WAIT_SECONDS = 30.0


def run_demo(show_rows: ShowRows, database: Path | None = None) -> int:
    """The demo, start to end; 0 when every row ended committed or parked, as it should.

    Its SQLite database is kept after the demo (``database``, else a new temporary
    directory), so the ``next:`` hints it prints work: they name it.
    """
    console = Console()
    setup("INFO", "text")
    path = database or Path(tempfile.mkdtemp(prefix="outbox-demo-")) / "outbox.db"
    if path.exists():
        raise OutboxError(f"{path} exists: the demo starts from a new database (--database)")
    with Simulator(api_keys=[DEMO_KEY], transfer_limit=Decimal("10000")) as sim:
        url = f"sqlite:///{path}"
        console.rule("1. schema: outbox db upgrade")
        engine = make_engine(url)
        upgrade(engine)
        console.print(f"database {url} at head; simulator listening on {sim.target}")
        console.rule("2. writers enqueue rows inside their own transactions")
        _fail_once(sim, _enqueue_examples(engine, console), console)
        console.rule("3. the daemon (outbox run) sends them")
        _run_daemon_until_idle(_demo_config(url, sim.target), Store(engine))
        console.rule("4. the state table (outbox list)")
        code = _report(Store(engine), sim, console, show_rows, url)
        engine.dispose()
    console.print(f"\nthe demo's database is kept: {path} (delete it when done)")
    return code


def _fail_once(sim: Simulator, flaky: str, console: Console) -> None:
    """The row ``flaky`` executes at Recrypt, but its first answer is UNAVAILABLE vgw-db."""
    fault = Fault(
        grpc.StatusCode.UNAVAILABLE, "vgw-db", execute=True, keys=frozenset([flaky]), times=1
    )
    sim.inject(fault)
    console.print(f"fault injected: {flaky} executes, but the answer is UNAVAILABLE vgw-db")


def _enqueue_examples(engine: sa.Engine, console: Console) -> str:
    """Four rows with ``outbox.enqueue``, one with a plain SQL INSERT; the key of the one the
    simulator will answer UNAVAILABLE after executing it."""
    with engine.begin() as conn:
        _transfer(conn, "125.00", "invoice-1001")
        flaky = _transfer(conn, "80.50", "invoice-1002")
        _transfer(conn, "25000.00", "invoice-1003 (over the transaction limit)")
        outbox.enqueue(conn, PLACE_ORDER, ORDER, lane="acme-trading", reference="order-1")
    with engine.begin() as conn:  # a foreign writer: plain SQL, any language
        conn.execute(
            sa.text(
                "INSERT INTO outbox_messages (idempotency_key, method, payload, reference) "
                "VALUES (:k, :m, :p, :r)"
            ),
            {"k": str(uuid.uuid4()), "m": TRANSFER, "r": "plain-sql-1", "p": FOREIGN_PAYLOAD},
        )
    console.print("5 rows enqueued: 4 with outbox.enqueue(), 1 with a plain SQL INSERT")
    return flaky


def _transfer(conn: sa.Connection, amount: str, memo: str) -> str:
    payload = {
        "fromAccount": "acme-ops",
        "toAccount": "supplier-7",
        "amount": amount,
        "currency": "AUD",
        "memo": memo,
    }
    return outbox.enqueue(conn, TRANSFER, payload, reference=memo)


ORDER = {
    "account": "acme-trading",
    "market": "BTC-AUD",
    "side": "SIDE_BUY",
    "type": "ORDER_TYPE_LIMIT",
    "quantity": "0.05",
    "limitPrice": "95000.00",
}
FOREIGN_PAYLOAD = '{"fromAccount": "acme-ops", "toAccount": "payroll", "amount": "990.00"}'


def _demo_config(url: str, target: str) -> Config:
    base = load(None, env={"RECRYPT_API_KEY": DEMO_KEY})
    return base.model_copy(
        update={
            "database": base.database.model_copy(update={"url": url}),
            "recrypt": base.recrypt.model_copy(update={"target": target, "tls": False}),
            "worker": base.worker.model_copy(update={"poll_interval": 0.2}),
            "retry": base.retry.model_copy(update={"initial_backoff": 0.3, "jitter": 0.0}),
            "metrics": base.metrics.model_copy(update={"listen": ""}),
            "maintenance": base.maintenance.model_copy(update={"rollover_window": ""}),
        }
    )


def _run_daemon_until_idle(config: Config, store: Store) -> None:
    daemon = Daemon(config)
    daemon.start()
    idle = threading.Event()
    try:
        deadline = utcnow().timestamp() + WAIT_SECONDS
        while not idle.wait(0.2) and utcnow().timestamp() < deadline:
            counts = store.status(utcnow()).counts
            if counts["pending"] == 0 and counts["inflight"] == 0:
                idle.set()
    finally:
        daemon.shutdown()
    logging.getLogger().handlers.clear()


def _report(store: Store, sim: Simulator, console: Console, show_rows: ShowRows, url: str) -> int:
    rows = list(reversed(store.list_rows(limit=50).rows))
    show_rows(console, rows)
    console.print(
        f"Recrypt's ledger: {len(sim.ledger)} effects, each key executed once: "
        f"{all(sim.executions(k) == 1 for k in sim.executed_keys())}"
    )
    for row in rows:
        if row.state == "parked":
            _next_steps(row, console, url)
    states = {r.state for r in rows}
    ok = states <= {"committed", "parked"} and "parked" in states
    return 0 if ok else 1


def _next_steps(row: RowView, console: Console, url: str) -> None:
    """What an operator does about a parked row, on the demo's database (kept)."""
    console.print(
        f"\n[bold]parked[/] {row.idempotency_key} ({row.park_reason}): {row.last_message}",
        markup=True,
    )
    key, on = row.idempotency_key, f"OUTBOX_DATABASE_URL={url}"
    console.print(
        f"  next: {on} outbox show {key}; then {on} outbox requeue {key} --reason '...' "
        "or outbox cancel ...",
        markup=False,
    )
    console.print(
        f"  or in the console: {on} outbox console user add me --role operator; "
        f"{on} outbox console  (then http://127.0.0.1:8765/)",
        markup=False,
    )
