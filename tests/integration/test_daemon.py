"""The daemon in-process: its jobs, and PostgreSQL wake-ups (LISTEN/NOTIFY)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import outbox
from outbox.config import load
from outbox.daemon import Daemon
from outbox.database import make_engine
from outbox.simulator import TRANSFER, Simulator
from outbox.tracing import Tracing

HOUR = 3600.0
KEY = "daemon-test-api-key"


def daemon_for(
    url: str,
    target: str,
    poll: float = HOUR,
    probe: float = 60.0,
    clock: Callable[[], datetime] | None = None,
    listen: str = "",
    tracing: Tracing | None = None,
) -> Daemon:
    """A daemon on ``url`` against ``target``; ``listen`` serves /metrics (e.g. port 0)."""
    base = load(None, env={"RECRYPT_API_KEY": KEY})
    config = base.model_copy(
        update={
            "database": base.database.model_copy(update={"url": url}),
            "recrypt": base.recrypt.model_copy(update={"target": target, "tls": False}),
            "worker": base.worker.model_copy(update={"poll_interval": poll}),
            "retry": base.retry.model_copy(update={"initial_backoff": 0.05}),
            "metrics": base.metrics.model_copy(update={"listen": listen}),
            "maintenance": base.maintenance.model_copy(
                update={"rollover_window": "", "probe_interval": probe}
            ),
        }
    )
    if clock is None:
        return Daemon(config, tracing=tracing)
    return Daemon(config, clock=clock, tracing=tracing)


def test_an_insert_wakes_the_daemon_without_polling(postgres_url) -> None:
    with Simulator(api_keys=[KEY]) as sim:
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
    with Simulator(api_keys=[KEY]) as sim:
        daemon = daemon_for(sqlite_url, sim.target)
        assert daemon.listener is None
        daemon.engine.dispose()


def test_every_job_is_scheduled_not_paused(sqlite_url) -> None:
    with Simulator(api_keys=[KEY]) as sim:
        daemon = daemon_for(sqlite_url, sim.target)
        daemon.start()
        try:
            jobs = daemon.scheduler.get_jobs()
            assert {j.id for j in jobs} >= {"dispatch", "probe", "renew", "reaper", "retention"}
            assert all(j.next_run_time is not None for j in jobs), [j.id for j in jobs]
        finally:
            daemon.shutdown()


def test_maintenance_ends_and_the_daemon_resumes_by_itself(db_url) -> None:
    with Simulator(api_keys=[KEY]) as sim:
        sim.set_maintenance(True)
        engine = make_engine(db_url)
        with engine.begin() as conn:
            key = outbox.enqueue(
                conn, TRANSFER, {"fromAccount": "a", "toAccount": "b", "amount": "1.00"}
            )
        daemon = daemon_for(db_url, sim.target, poll=0.1, probe=0.5)
        daemon.start()
        try:
            assert sim.wait_for(lambda s: s.call_count() >= 3, timeout=10)  # probing
            assert daemon.gates.view(daemon.clock()).gate == "maintenance"
            sim.set_maintenance(False)
            assert sim.wait_for(lambda s: key in s.executed_keys(), timeout=15)
        finally:
            daemon.shutdown()
            engine.dispose()
