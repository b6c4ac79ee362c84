"""``outbox run`` as a process through a real PostgreSQL outage while its calls are answered
(issue 9 §1): the answers are recorded once the database is back, and a SIGTERM within the
lease never hands back untouched a row whose call executed."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from outbox.database import make_engine
from outbox.simulator import TRANSFER, Fault, Simulator
from outbox.store import Store
from tests.e2e.test_process import enqueue_many, start_daemon, write_config
from tests.integration.test_record_outage import postgres_outage

pytestmark = pytest.mark.slow


def wait_for_line(log: Path, text: str, timeout: float = 30.0) -> bool:
    """The daemon's own log line is the event we synchronise on."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if text in log.read_text():
            return True
        time.sleep(0.05)  # polling a file another process writes: no event to wait on
    return False


def rows(url: str, keys: list[str]) -> list[tuple[str, int, bool]]:
    engine = make_engine(url)
    try:
        store = Store(engine)
        return [(v.state, v.attempts, v.maybe_executed) for v in map(store.get, keys)]
    finally:
        engine.dispose()


def test_sigterm_after_an_outage_records_every_answer(
    postgres_url: str, sim: Simulator, tmp_path: Path
) -> None:
    keys = enqueue_many(postgres_url, 5)
    release = threading.Event()
    held = sim.inject(Fault(grpc.StatusCode.OK, methods=frozenset({TRANSFER}), hang=release))
    config = write_config(tmp_path, postgres_url, sim.target, lease=30.0)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, log)
    try:
        assert sim.wait_for(lambda _s: held.hits == 5, timeout=30), log.read_text()
        with postgres_outage(postgres_url):
            release.set()  # Recrypt executes all five and answers OK...
            assert wait_for_line(log, "event=job_failed job=record"), log.read_text()  # unrecorded
        daemon.send_signal(signal.SIGTERM)  # within the lease, before the next poll records
        assert daemon.wait(timeout=60) == 0, log.read_text()
    finally:
        daemon.kill()
    assert rows(postgres_url, keys) == [("committed", 1, False)] * 5, log.read_text()
    assert all(sim.executions(k) == 1 for k in keys)
