"""``outbox run`` as a real process: killed mid-batch, stopped by signals, restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

import outbox
from outbox.database import make_engine
from outbox.simulator import TRANSFER, Fault
from outbox.store import Store

API_KEY = "e2e-secret-api-key-7f3a"
pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, url: str, target: str, **worker: float) -> Path:
    lease = worker.get("lease", 2.0)
    deadline = min(30.0, lease / 2)  # [worker] lease must outlive a call
    path = tmp_path / "outbox.toml"
    path.write_text(
        f"""
[database]
url = "{url}"
[recrypt]
target = "{target}"
tls = false
deadline = {deadline}
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


def wait_until(predicate, timeout: float) -> bool:
    """Poll an observable state (the database) until it holds or the timeout passes."""
    pause = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return True
        pause.wait(0.05)
    return predicate()


def worker_gates(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        return [w.gate for w in Store(engine).list_workers() if w.stopped_at is None]
    finally:
        engine.dispose()


def test_wrong_key_halts_then_sighup_with_the_right_key_commits(db_url, sim, tmp_path) -> None:
    keys = enqueue_many(db_url, 8)
    key_file = tmp_path / "api-key"
    key_file.write_text("not-the-key\n")
    key_file.chmod(0o600)
    config = write_config(tmp_path, db_url, sim.target)
    config.write_text(
        config.read_text().replace("tls = false", f"tls = false\napi_key_file = '{key_file}'")
        + "unauthenticated_probe_interval = 600.0\n"
    )
    log = tmp_path / "daemon.log"
    env = os.environ.copy()
    env.pop("RECRYPT_API_KEY", None)
    env.pop("OUTBOX_DATABASE_URL", None)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox.cli", "--config", str(config), "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        assert wait_until(lambda: worker_gates(db_url) == ["unauthenticated"], 30), log.read_text()
        refused = sim.call_count()
        assert all(c.code == "UNAUTHENTICATED" for c in sim.calls)
        assert refused <= 8 + 2  # one batch and the start-up MaintenanceCheck, then silence
        engine = make_engine(db_url)
        # the gate can close (start-up MaintenanceCheck, or the batch's fold) before the batch
        # is recorded: wait for the record, then nothing may be parked or committed
        settled = wait_until(
            lambda: "inflight" not in {Store(engine).get(k).state for k in keys}, 10
        )
        states = {Store(engine).get(k).state for k in keys}
        engine.dispose()
        assert settled and states == {"pending"}, states  # nothing parked, nothing committed
        key_file.write_text(API_KEY + "\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: all_committed(db_url, keys), 30), log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "event=reloaded" in text
    assert API_KEY not in text and "not-the-key" not in text
    assert all(sim.executions(k) == 1 for k in keys)


@pytest.mark.parametrize("server", ["postgres_url", "mariadb_url"])
def test_lanes_stay_ordered_across_two_daemons(server, request, sim, tmp_path) -> None:
    url = request.getfixturevalue(server)
    engine = make_engine(url)
    lanes: dict[str, list[str]] = {}
    with engine.begin() as conn:
        for i in range(12):  # interleaved inserts: lanes' rows are not contiguous ids
            for lane in (f"acct-{n}" for n in range(6)):
                payload = {"fromAccount": lane, "toAccount": "b", "amount": f"{i + 1}.00"}
                key = outbox.enqueue(conn, TRANSFER, payload, lane=lane)
                lanes.setdefault(lane, []).append(key)
        free = [
            outbox.enqueue(conn, TRANSFER, {"fromAccount": "x", "toAccount": "y", "amount": "1"})
            for _ in range(30)
        ]
    engine.dispose()
    config = write_config(tmp_path, url, sim.target)
    procs = [start_daemon(config, tmp_path / f"daemon{n}.log") for n in range(2)]
    every = [k for keys in lanes.values() for k in keys] + free
    try:
        assert sim.wait_for(lambda s: s.executed_keys() >= set(every), timeout=90)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=30) for proc in procs] == [0, 0]
    ledger = [entry.key for entry in sim.ledger]
    for keys in lanes.values():
        assert [k for k in ledger if k in set(keys)] == keys
    assert all(sim.executions(k) == 1 for k in every)
    engine = make_engine(url)
    workers = {w.worker_id for w in Store(engine).list_workers()}
    engine.dispose()
    assert len(workers) == 2


@pytest.mark.parametrize("server", ["postgres_url", "mariadb_url"])
def test_two_daemons_share_a_backlog_and_send_each_key_once(server, request, sim, tmp_path):
    url = request.getfixturevalue(server)
    keys = enqueue_many(url, 400)
    config = write_config(tmp_path, url, sim.target)
    procs = [start_daemon(config, tmp_path / f"d{n}.log") for n in range(2)]
    try:
        assert sim.wait_for(lambda s: s.executed_keys() >= set(keys), timeout=90)
        assert wait_until(lambda: all_committed(url, keys), 30)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=30) for proc in procs] == [0, 0]
    sent = [c.key for c in sim.calls if c.key in set(keys)]
    assert sorted(sent) == sorted(keys)  # steady state: no key sent twice
    engine = make_engine(url)
    with engine.connect() as conn:
        per_worker = conn.execute(
            sa.text("SELECT actor, COUNT(*) FROM outbox_attempts GROUP BY actor")
        ).all()
    engine.dispose()
    assert len(per_worker) == 2, per_worker  # both daemons did part of the work
