"""Monitoring that tells the truth (issue 12): ``check``, ``status``, ``/readyz`` and the metrics
report a job that keeps failing (which, since when, the last error), rows in flight whose lease
expired, and any gate under which nothing can be sent. Real databases, the real command line,
a real daemon against the simulator; a database failure made by the database itself (the history
table out of reach, as for a role without its grants)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine

import outbox
from outbox.daemon import Daemon
from outbox.health import JOBS, KEEPS_FAILING_RUNS, JobFailure
from outbox.policy import Gate
from outbox.schema import messages
from outbox.simulator import Simulator
from outbox.store import Store, WorkerBeat
from tests.integration.test_check import beat, check
from tests.integration.test_cli import Cli
from tests.integration.test_daemon import KEY, daemon_for

TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"
DENIED = "ProgrammingError [42501]: permission denied for sequence outbox_attempts_id_seq"


@pytest.fixture
def cli(db_url: str) -> Cli:
    return Cli(db_url)


@pytest.fixture
def store(engine: Engine) -> Store:
    return Store(engine)


def now() -> datetime:
    return datetime.now(UTC)


def failing_beat(store: Store, worker_id: str = "w1", *, for_s: float = 120.0) -> None:
    at = now()
    failure = JobFailure("record", at - timedelta(seconds=for_s), 40, DENIED)
    made = WorkerBeat(
        worker_id, "host", 1, "0.1.0", at - timedelta(hours=1), failing_jobs=(failure,)
    )
    store.heartbeat(made, at)


def enqueue(engine: Engine, amount: str = "1.00") -> str:
    with engine.begin() as conn:
        return outbox.enqueue(
            conn, TRANSFER, {"fromAccount": "a", "toAccount": "b", "amount": amount}
        )


def expire_lease(engine: Engine, key: str, ago: float) -> None:
    """The row as a daemon that died (or cannot record) leaves it: in flight, lease run out."""
    with engine.begin() as conn:
        conn.execute(
            messages.update()
            .where(messages.c.idempotency_key == key)
            .values(
                state="inflight",
                lease_owner="gone:1:dead",
                lease_expires_at=now() - timedelta(seconds=ago),
                attempts=1,
            )
        )


# --------------------------------------------------------------------------- (a) failing jobs


def test_a_failing_job_makes_check_critical_naming_it_since_when_and_the_error(
    cli: Cli, store: Store
) -> None:
    failing_beat(store)
    line = check(cli, 2)
    assert line.startswith("CRITICAL: ")
    assert "job record failing on w1 for 2 min (40 runs)" in line
    assert DENIED in line and "grants" in line


def test_status_shows_the_failing_job_and_keeps_the_gate_reason_apart(
    cli: Cli, store: Store
) -> None:
    failing_beat(store)
    (worker,) = cli.json("status")["workers"]
    (failure,) = worker["failing_jobs"]
    assert failure["job"] == "record" and failure["runs"] == 40 and failure["error"] == DENIED
    assert worker["gate_reason"] is None
    out = cli.invoke("status", COLUMNS="200").stdout
    assert "w1: job record failing for 2 min (40 runs): " + DENIED in out


def test_a_failure_cleared_by_the_next_beat_is_gone(cli: Cli, store: Store) -> None:
    failing_beat(store)
    beat(store)
    assert check(cli, 0).startswith("OK: ")
    assert cli.json("status")["workers"][0]["failing_jobs"] == []


# --------------------------------------------------------------------------- (b) expired leases


def test_rows_in_flight_with_an_expired_lease_make_check_critical(
    cli: Cli, engine: Engine, store: Store
) -> None:
    beat(store)  # a live worker, whose reaper should have released them
    for amount in ("1.00", "2.00"):
        expire_lease(engine, enqueue(engine, amount), ago=5 * 60)
    line = check(cli, 2)
    assert "2 rows in flight with a lease expired 5 min ago" in line
    assert "job_failed job=reaper" in line


def test_a_lease_just_expired_is_the_reapers_to_release_not_an_alarm(
    cli: Cli, engine: Engine, store: Store
) -> None:
    beat(store)
    expire_lease(engine, enqueue(engine), ago=5)
    assert check(cli, 0).startswith("OK: ")


def test_status_counts_expired_leases(cli: Cli, engine: Engine, store: Store) -> None:
    expire_lease(engine, enqueue(engine), ago=5 * 60)
    view = cli.json("status")
    assert view["leases_expired"] == 1 and view["oldest_lease_expired_age_seconds"] >= 299
    assert "rows in flight with an expired lease: 1 (oldest 5 min)" in cli.invoke("status").stdout


# --------------------------------------------------------------------------- (c) gates


@pytest.mark.parametrize("gate", ["unreachable", "unauthenticated"])
def test_a_gate_that_sends_nothing_says_what_to_do(cli: Cli, store: Store, gate: str) -> None:
    beat(store, gate=gate, closed_ago=90)
    line = check(cli, 2 if gate == "unauthenticated" else 1)
    assert f"gate {gate} on w1 for 1 min: because {gate}" in line


# --------------------------------------------------------------------------- the daemon


@pytest.fixture
def daemon(sqlite_url: str) -> Iterator[Daemon]:
    with Simulator(api_keys=[KEY]) as sim:
        made = daemon_for(sqlite_url, sim.target)
        yield made
        made.engine.dispose()


# The history table out of reach: the record fails, as it does for a role without its grants.
HIDE_HISTORY = "ALTER TABLE outbox_attempts RENAME TO attempts_away"
SHOW_HISTORY = "ALTER TABLE attempts_away RENAME TO outbox_attempts"


def run_job(daemon: Daemon, name: str) -> None:
    (service,) = [s for s in daemon.services if s.name == name]
    daemon._guard(service)()


def test_a_record_that_keeps_failing_reaches_readyz_the_beat_and_the_metrics(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue(daemon.engine)
    with daemon.engine.begin() as conn:
        conn.exec_driver_sql(HIDE_HISTORY)
    caplog.set_level(logging.INFO, logger="outbox")
    for _ in range(KEEPS_FAILING_RUNS + 3):
        run_job(daemon, "dispatch")
    ready, why = daemon.readiness()
    assert not ready and why.startswith("job record failing since ")
    assert "no such table: outbox_attempts" in why
    assert "job_failed" in caplog.text and caplog.text.count("job_failed") == 1
    assert 'outbox_job_failing{job_name="record"} 1.0' in daemon.metrics.render().decode()

    run_job(daemon, "heartbeat")
    (worker,) = daemon.store.list_workers()
    assert [f.job for f in worker.failing_jobs] == ["record"]

    with daemon.engine.begin() as conn:
        conn.exec_driver_sql(SHOW_HISTORY)
    run_job(daemon, "dispatch")
    assert daemon.readiness() == (True, "ready: gate open")
    assert "event=job_recovered job=record" in caplog.text
    assert 'outbox_job_failing{job_name="record"} 0.0' in daemon.metrics.render().decode()


def test_a_job_that_raises_is_logged_once_then_its_recovery(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="outbox")
    with daemon.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE outbox_workers RENAME TO workers_away")
    for _ in range(10):
        run_job(daemon, "heartbeat")
    assert caplog.text.count("event=job_failed job=heartbeat") == 1
    assert not daemon.readiness()[0]
    with daemon.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE workers_away RENAME TO outbox_workers")
    run_job(daemon, "heartbeat")
    assert "event=job_recovered job=heartbeat failures=10" in caplog.text
    assert daemon.readiness()[0]


def test_expired_leases_make_readyz_503_and_reach_the_metrics(daemon: Daemon) -> None:
    expire_lease(daemon.engine, enqueue(daemon.engine), ago=10 * 60)
    run_job(daemon, "table")
    ready, why = daemon.readiness()
    assert not ready and why.startswith("1 row in flight with a lease expired 10 min ago")
    assert "outbox_leases_expired_rows 1.0" in daemon.metrics.render().decode()


@pytest.mark.parametrize(
    "gate", [Gate.UNREACHABLE, Gate.ROLLOVER, Gate.MAINTENANCE, Gate.UNAUTHENTICATED]
)
def test_a_gate_under_which_nothing_is_sent_makes_readyz_503(daemon: Daemon, gate: Gate) -> None:
    daemon.gates.on_answer(gate, daemon.clock(), "vgw-db")
    ready, why = daemon.readiness()
    assert not ready and f"gate {gate}" in why
    assert "outbox_sending_blocked 1.0" in daemon.metrics.render().decode()


def test_rate_limited_still_sends_and_stays_ready(daemon: Daemon) -> None:
    daemon.gates.on_answer(Gate.RATE_LIMITED, daemon.clock(), "slow down")
    assert daemon.readiness()[0]


def test_every_job_has_a_metric_series(daemon: Daemon) -> None:
    assert {s.name for s in daemon.services} | {"record"} <= set(JOBS)
    rendered = daemon.metrics.render().decode()
    assert all(f'outbox_job_failing{{job_name="{job}"}} 0.0' in rendered for job in JOBS)


def test_the_expired_lease_count_reads_the_lease_index(store: Store) -> None:
    plan = store.explain_expired_leases(now())
    # MariaDB on a table with no such row answers MIN() from the index without reading it
    assert "ix_outbox_messages_lease" in plan or "No matching min/max row" in plan, plan
