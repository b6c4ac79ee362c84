"""A real console over HTTP for tests: uvicorn on 127.0.0.1 port 0 in a thread, seeded rows.

``seed`` writes rows in every shape the pages show (parked by reason, maybe executed, a
blocked lane, history lines, markup in a payload and a reference); rows are parked with plain
SQL, as a test may (the daemon's paths to these states have their own tests).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
import uvicorn
from sqlalchemy.engine import Engine
from starlette.applications import Starlette

import outbox
from outbox.console.app import make_app
from outbox.console.settings import ConsoleSettings
from outbox.console.users import Role, User, hash_password, write_users
from outbox.report import FieldMap
from outbox.schema import attempts, messages
from outbox.store import Store, WorkerBeat

TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"
PLACE_ORDER = "/recrypt.market.v1.Market/PlaceOrder"
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
PASSWORD = "correct horse battery"
SECRET = "a-test-secret-that-is-long-enough-for-the-console"


@dataclass(frozen=True)
class Seeded:
    precondition: str  # parked precondition (a transfer)
    unknown: str  # parked unknown_outcome, maybe_executed
    marked: str  # parked rejected; payload and reference hold markup
    lane_head: str  # parked, holds lane "acme-trading"
    pending: str


def settings_for(tmp: Path, *, dual_control: bool = False, proxy: str = "") -> ConsoleSettings:
    users = tmp / "users.json"
    write_users(
        users,
        {
            "olga": User("olga", Role.OPERATOR, hash_password(PASSWORD)),
            "otto": User("otto", Role.OPERATOR, hash_password(PASSWORD)),
            "vera": User("vera", Role.VIEWER, hash_password(PASSWORD)),
        },
    )
    return ConsoleSettings(
        users_file=users,
        secret_file=tmp / "secret",
        host="127.0.0.1",
        port=0,
        proxy_header=proxy.lower(),
        dual_control=dual_control,
        redact_fields=("from_account", "to_account", "account"),
    )


def _transfer(memo: str, amount: str = "125.00") -> dict[str, str]:
    return {
        "fromAccount": "acme-ops",
        "toAccount": "supplier-7",
        "amount": amount,
        "currency": "AUD",
        "memo": memo,
    }


def _park(engine: Engine, key: str, reason: str, *, maybe: bool = False, code: str) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        row_id = conn.execute(
            sa.select(messages.c.id).where(messages.c.idempotency_key == key)
        ).scalar_one()
        conn.execute(
            messages.update()
            .where(messages.c.id == row_id)
            .values(
                state="parked",
                park_reason=reason,
                maybe_executed=maybe,
                attempts=1,
                last_code=code,
                last_message=f"Recrypt said: {code.lower()} for test",
                updated_at=now,
            )
        )
        conn.execute(
            attempts.insert().values(
                message_id=row_id,
                at=now - timedelta(seconds=5),
                kind="call",
                actor="w1",
                code=code,
                message=f"Recrypt said: {code.lower()}",
                decision="park",
                duration_ms=12.0,
            )
        )


def seed(engine: Engine) -> Seeded:
    with engine.begin() as conn:
        keys = [
            outbox.enqueue(conn, TRANSFER, _transfer("invoice-1"), reference="invoice-1"),
            outbox.enqueue(conn, TRANSFER, _transfer("invoice-2"), reference="invoice-2"),
            outbox.enqueue(conn, TRANSFER, _transfer(SCRIPT + IMG), reference=SCRIPT + IMG),
            outbox.enqueue(
                conn,
                PLACE_ORDER,
                {
                    "account": "acme-trading",
                    "market": "BTC-AUD",
                    "side": "SIDE_BUY",
                    "type": "ORDER_TYPE_LIMIT",
                    "quantity": "0.05",
                    "limitPrice": "95000.00",
                },
                lane="acme-trading",
                reference="order-1",
            ),
            outbox.enqueue(conn, TRANSFER, _transfer("invoice-3"), reference="invoice-3"),
        ]
    seeded = Seeded(*keys)
    _park(engine, seeded.precondition, "precondition", code="FAILED_PRECONDITION")
    _park(engine, seeded.unknown, "unknown_outcome", maybe=True, code="UNKNOWN")
    _park(engine, seeded.marked, "rejected", code="INVALID_ARGUMENT")
    _park(engine, seeded.lane_head, "precondition", code="FAILED_PRECONDITION")
    with engine.begin() as conn:  # a row waiting behind the lane's parked head
        outbox.enqueue(conn, PLACE_ORDER, _order(), lane="acme-trading", reference="order-2")
    return seeded


def _order() -> dict[str, str]:
    return {
        "account": "acme-trading",
        "market": "BTC-AUD",
        "side": "SIDE_SELL",
        "type": "ORDER_TYPE_LIMIT",
        "quantity": "0.05",
        "limitPrice": "99000.00",
    }


@contextmanager
def serving(
    store: Store, settings: ConsoleSettings, report_fields: FieldMap | None = None
) -> Iterator[str]:
    """The console's base URL, served by uvicorn on a free loopback port until exit."""
    with serving_app(make_app(store, settings, SECRET, report_fields)) as url:
        yield url


@contextmanager
def serving_app(app: Starlette) -> Iterator[str]:
    """``app``'s base URL, served by uvicorn in a thread on a free loopback port until exit
    (the tests' console, and ``bench.console``'s)."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        proxy_headers=False,
        server_header=False,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the console did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def seed_activity(store: Store, hours: int = 3) -> None:
    """History over the last hours (commits, retries, parks) and one live worker, so the
    overview's chart and workers table look like a day at work (the screenshot)."""
    now = store.database_now()
    with store.engine.begin() as conn:
        ids = [
            conn.execute(
                messages.insert().values(
                    idempotency_key=str(uuid.UUID(int=n + 1)),
                    method=TRANSFER,
                    payload=_transfer(f"batch-{n}"),
                    state="committed",
                    attempts=1,
                    created_at=now - timedelta(minutes=n),
                    committed_at=now - timedelta(minutes=n),
                    updated_at=now - timedelta(minutes=n),
                )
            ).inserted_primary_key[0]
            for n in range(hours * 60)
        ]
        conn.execute(attempts.insert(), list(_activity_lines(ids, now)))
    store.heartbeat(
        WorkerBeat("vm:4242:5b26e73a", "vm", 4242, outbox.__version__, now - timedelta(hours=5)),
        now,
    )


def _activity_lines(ids: list[int], now: datetime) -> Iterator[dict[str, object]]:
    for n, row_id in enumerate(ids):
        at = now - timedelta(minutes=n)
        wave = 1 + (n % 7 == 0) + (n % 13 == 0) * 2
        for retry in range(wave - 1):
            yield _line(row_id, at - timedelta(seconds=30 + retry), "UNAVAILABLE", "retry")
        yield _line(row_id, at, "OK", "commit")
        if n % 17 == 5:
            yield _line(row_id, at, "FAILED_PRECONDITION", "park")


def _line(row_id: int, at: datetime, code: str, decision: str) -> dict[str, object]:
    return {
        "message_id": row_id,
        "at": at,
        "kind": "call",
        "actor": "vm:4242:5b26e73a",
        "code": code,
        "message": None,
        "decision": decision,
        "duration_ms": 9.0,
    }
