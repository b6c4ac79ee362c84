"""The latency metrics (issue 15): how long rows wait to their first send and to their commit,
and each call's duration by method and code; and the liveness gauges the alert rules read.
A real daemon on SQLite against the simulator; the values read back from the rendered text."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest
from sqlalchemy.engine import Engine

from outbox.daemon import Daemon
from outbox.schema import messages
from outbox.simulator import Fault, Simulator
from outbox.store import WorkerBeat
from tests.integration.test_daemon import KEY, daemon_for
from tests.integration.test_monitoring import TRANSFER, enqueue, now, run_job
from tests.unit.test_metrics import Samples, samples_of


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(api_keys=[KEY]) as simulator:
        yield simulator


@pytest.fixture
def daemon(sqlite_url: str, sim: Simulator) -> Iterator[Daemon]:
    made = daemon_for(sqlite_url, sim.target)
    yield made
    made.engine.dispose()


@pytest.fixture
def any_daemon(db_url: str, sim: Simulator) -> Iterator[Daemon]:
    """On each database: each reads the row's times in its own claim (PostgreSQL's RETURNING)."""
    made = daemon_for(db_url, sim.target)
    yield made
    made.engine.dispose()


def samples(daemon: Daemon) -> Samples:
    return samples_of(daemon.metrics.render().decode())


def due_now(engine: Engine, key: str) -> None:
    """The retried row's backoff over (the clock would get there; the test does not wait)."""
    with engine.begin() as conn:
        conn.execute(
            messages.update()
            .where(messages.c.idempotency_key == key)
            .values(next_attempt_at=now() - timedelta(seconds=1))
        )


METHOD = (("method", TRANSFER),)


def test_a_row_sent_once_is_one_first_send_one_commit_and_one_ok_call(any_daemon: Daemon) -> None:
    daemon = any_daemon
    enqueue(daemon.engine)
    run_job(daemon, "dispatch")

    seen = samples(daemon)
    assert seen[("outbox_enqueue_to_first_send_seconds_count", METHOD)] == 1
    assert 0 <= seen[("outbox_enqueue_to_first_send_seconds_sum", METHOD)] < 10
    assert seen[("outbox_enqueue_to_committed_seconds_count", METHOD)] == 1
    waited = seen[("outbox_enqueue_to_committed_seconds_sum", METHOD)]
    assert seen[("outbox_enqueue_to_first_send_seconds_sum", METHOD)] <= waited < 10
    assert seen[("outbox_submit_seconds_count", (("code", "OK"), *METHOD))] == 1


def test_a_retried_row_has_one_first_send_and_a_call_per_attempt(
    daemon: Daemon, sim: Simulator
) -> None:
    sim.inject(Fault(grpc.StatusCode.UNAVAILABLE, "connection reset", times=1))
    key = enqueue(daemon.engine)
    run_job(daemon, "dispatch")
    seen = samples(daemon)
    assert seen[("outbox_enqueue_to_first_send_seconds_count", METHOD)] == 1
    assert seen[("outbox_enqueue_to_committed_seconds_count", METHOD)] == 0
    assert seen[("outbox_submit_seconds_count", (("code", "UNAVAILABLE"), *METHOD))] == 1

    due_now(daemon.engine, key)
    run_job(daemon, "dispatch")
    seen = samples(daemon)
    assert seen[("outbox_enqueue_to_first_send_seconds_count", METHOD)] == 1  # not again
    assert seen[("outbox_enqueue_to_committed_seconds_count", METHOD)] == 1
    assert seen[("outbox_submit_seconds_count", (("code", "OK"), *METHOD))] == 1


def test_a_silent_worker_and_this_daemons_heartbeat_reach_the_metrics(daemon: Daemon) -> None:
    assert samples(daemon)[("outbox_heartbeat_timestamp_seconds", ())] == 0
    run_job(daemon, "heartbeat")
    assert samples(daemon)[("outbox_heartbeat_timestamp_seconds", ())] > now().timestamp() - 60

    long_ago = now() - timedelta(minutes=10)
    dead = WorkerBeat("dead:1:gone", "host", 1, "0.1.0", long_ago - timedelta(hours=1))
    daemon.store.heartbeat(dead, long_ago)
    run_job(daemon, "table")
    assert samples(daemon)[("outbox_workers_silent", ())] == 1  # the dead one, not this one

    daemon.store.worker_stopped("dead:1:gone", long_ago)
    run_job(daemon, "table")
    assert samples(daemon)[("outbox_workers_silent", ())] == 0  # stopped is not silent
