"""``outbox run`` as a real process: killed mid-batch, stopped by signals, restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

import outbox
from outbox.database import make_engine
from outbox.simulator import TRANSFER, Fault, Simulator
from outbox.store import Store

API_KEY = "e2e-secret-api-key-7f3a"
pytestmark = pytest.mark.slow


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(api_keys=[API_KEY])
    simulator.start()
    yield simulator
    simulator.stop()


def write_config(tmp_path: Path, url: str, target: str, **worker: float) -> Path:
    lease = worker.get("lease", 2.0)
    path = tmp_path / "outbox.toml"
    path.write_text(
        f"""
[database]
url = "{url}"
[recrypt]
target = "{target}"
tls = false
deadline = 30.0
[worker]
batch_size = 20
max_in_flight = 20
poll_interval = 0.1
lease = {lease}
[retry]
initial_backoff = 0.1
jitter = 0.0
[metrics]
listen = ""
[maintenance]
rollover_window = ""
"""
    )
    return path


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {"RECRYPT_API_KEY": API_KEY}
    env.pop("OUTBOX_DATABASE_URL", None)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "outbox.cli", "--config", str(config), "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def enqueue_many(url: str, n: int) -> list[str]:
    engine = make_engine(url)
    with engine.begin() as conn:
        keys = [
            outbox.enqueue(
                conn, TRANSFER, {"fromAccount": "a", "toAccount": "b", "amount": f"{i}.00"}
            )
            for i in range(1, n + 1)
        ]
    engine.dispose()
    return keys


def all_committed(url: str, keys: list[str]) -> bool:
    engine = make_engine(url)
    try:
        states = {Store(engine).get(k).state for k in keys}
    finally:
        engine.dispose()
    return states == {"committed"}


def test_sigkill_mid_batch_then_restart_executes_each_key_once(db_url, sim, tmp_path) -> None:
    keys = enqueue_many(db_url, 40)
    release = threading.Event()
    # Half of the first batch hangs inside Recrypt: the daemon dies with those calls in flight.
    held = frozenset(keys[:10])
    hang = sim.inject(Fault(grpc.StatusCode.OK, keys=held, hang=release))
    config = write_config(tmp_path, db_url, sim.target)
    log = tmp_path / "daemon.log"
    first = start_daemon(config, log)
    try:
        arrived = sim.wait_for(lambda s: hang.hits >= 10 and s.call_count() >= 10, timeout=30)
        assert arrived, log.read_text()
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        first.kill()
    release.set()  # the held calls now execute at Recrypt: their answers reach no one
    assert sim.wait_for(lambda s: held <= s.executed_keys(), timeout=10)
    sim.clear_faults()
    second = start_daemon(config, log)
    try:
        done = sim.wait_for(lambda s: s.executed_keys() >= set(keys), timeout=60)
        assert done, log.read_text()
        for _ in range(300):
            if all_committed(db_url, keys):
                break
            sim.wait_for(lambda s: False, timeout=0.1)
        assert all_committed(db_url, keys), log.read_text()
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    assert all(sim.executions(k) == 1 for k in keys)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        resent = conn.execute(
            sa.text("SELECT COUNT(*) FROM outbox_messages WHERE maybe_executed")
        ).scalar_one()
    engine.dispose()
    assert resent >= 1  # the rows whose lease expired were marked and resent with their key
    assert API_KEY not in log.read_text()


def test_sigterm_exits_zero_and_hands_back_rows(db_url, sim, tmp_path) -> None:
    keys = enqueue_many(db_url, 5)
    sim.set_maintenance(True)  # nothing can be sent: rows stay pending
    config = write_config(tmp_path, db_url, sim.target, lease=600.0)
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    assert sim.wait_for(lambda s: s.call_count() >= 1, timeout=30), log.read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()
    engine = make_engine(db_url)
    store = Store(engine)
    rows = [store.get(k) for k in keys]
    workers = store.list_workers()
    engine.dispose()
    assert {r.state for r in rows} == {"pending"}
    assert {r.attempts for r in rows} == {0}
    assert [w.stopped_at is not None for w in workers] == [True]
    assert "event=stopped" in log.read_text()
