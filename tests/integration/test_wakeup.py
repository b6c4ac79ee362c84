"""PostgreSQL wake-ups: with polling effectively off, only LISTEN/NOTIFY can send a row."""

from __future__ import annotations

import outbox
from outbox.config import load
from outbox.daemon import Daemon
from outbox.database import make_engine
from outbox.simulator import TRANSFER, Simulator

HOUR = 3600.0


def daemon_for(url: str, target: str) -> Daemon:
    base = load(None, env={"RECRYPT_API_KEY": "k"})
    config = base.model_copy(
        update={
            "database": base.database.model_copy(update={"url": url}),
            "recrypt": base.recrypt.model_copy(update={"target": target, "tls": False}),
            "worker": base.worker.model_copy(update={"poll_interval": HOUR}),
            "metrics": base.metrics.model_copy(update={"listen": ""}),
            "maintenance": base.maintenance.model_copy(update={"rollover_window": ""}),
        }
    )
    return Daemon(config)


def test_an_insert_wakes_the_daemon_without_polling(postgres_url) -> None:
    with Simulator(api_keys=["k"]) as sim:
        daemon = daemon_for(postgres_url, sim.target)
        daemon.start()
        try:
            assert daemon.listener is not None
            assert daemon.listener.connected.wait(10)
            sim.wait_for(lambda s: s.call_count() >= 1, timeout=5)  # start-up MaintenanceCheck
            engine = make_engine(postgres_url)
            keys = []
            for amount in ("1.00", "2.00", "3.00"):  # three separate transactions
                with engine.begin() as conn:
                    payload = {"fromAccount": "a", "toAccount": "b", "amount": amount}
                    keys.append(outbox.enqueue(conn, TRANSFER, payload))
                assert sim.wait_for(lambda s, k=keys[-1]: k in s.executed_keys(), timeout=10)
            engine.dispose()
        finally:
            daemon.shutdown()


def test_sqlite_has_no_listener(sqlite_url) -> None:
    with Simulator(api_keys=["k"]) as sim:
        daemon = daemon_for(sqlite_url, sim.target)
        assert daemon.listener is None
        daemon.engine.dispose()
