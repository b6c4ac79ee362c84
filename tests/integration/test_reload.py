"""SIGHUP applies what the README says, and nothing under a running job (issue 9 §1)."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from pathlib import Path

import grpc
import sqlalchemy as sa

import outbox
from outbox.config import load
from outbox.daemon import Daemon
from outbox.database import make_engine
from outbox.schema import messages
from outbox.services import Retention
from outbox.simulator import TRANSFER, Fault, Simulator
from outbox.store import Store

KEY = "reload-test-api-key"
C = grpc.StatusCode


def write_config(path: Path, url: str, target: str, retention_days: float) -> Path:
    key_file = path.parent / "api-key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    path.write_text(
        f"""
[database]
url = "{url}"
[recrypt]
target = "{target}"
tls = false
api_key_file = "{key_file}"
[worker]
poll_interval = 3600.0
[metrics]
listen = ""
[maintenance]
rollover_window = ""
[retention]
days = {retention_days}
"""
    )
    return path


def daemon_from(path: Path) -> Daemon:
    return Daemon(load(path), str(path))


def transfer(amount: str) -> dict[str, str]:
    return {"fromAccount": "a", "toAccount": "b", "amount": amount, "currency": "AUD"}


def test_a_reload_never_cancels_a_call_in_flight(db_url, tmp_path) -> None:
    engine = make_engine(db_url)
    with engine.begin() as conn:
        key = outbox.enqueue(conn, TRANSFER, transfer("5.00"))
    with Simulator(api_keys=[KEY]) as sim:
        release = threading.Event()
        held = sim.inject(Fault(C.OK, methods=frozenset({TRANSFER}), hang=release, times=1))
        config = write_config(tmp_path / "outbox.toml", db_url, sim.target, 30)
        daemon = daemon_from(config)
        daemon.start()
        try:
            assert sim.wait_for(lambda _s: held.hits == 1, timeout=10)
            daemon.reload()  # SIGHUP while the Transfer is in flight
            release.set()
            assert daemon.wait_idle(10)
            assert sim.wait_for(lambda s: key in s.executed_keys(), timeout=10)
        finally:
            daemon.shutdown()
    view = Store(engine).get(key)
    engine.dispose()
    # the call finished on the old channel: committed at the first attempt, nothing unknown
    assert (view.state, view.attempts, view.maybe_executed) == ("committed", 1, False)


def test_a_reload_does_not_touch_retention(db_url, tmp_path, caplog) -> None:
    """Retention keeps the settings it was started with: days = 0 ("never") in the file must
    not turn the running purge into "delete every finished row"."""
    engine = make_engine(db_url)
    with Simulator(api_keys=[KEY]) as sim:
        config = write_config(tmp_path / "outbox.toml", db_url, sim.target, 30)
        daemon = daemon_from(config)
        with engine.begin() as conn:
            key = outbox.enqueue(conn, TRANSFER, transfer("6.00"))
            conn.execute(sa.update(messages).values(state="committed"))
        write_config(config, db_url, sim.target, 0)  # the operator edits the file...
        with caplog.at_level(logging.WARNING, logger="outbox.daemon"):
            daemon.reload()  # ...and reloads
        (retention,) = [s for s in daemon.services if isinstance(s, Retention)]
        retention.run_once(daemon.clock() + timedelta(days=1))
        daemon.engine.dispose()
    assert Store(engine).get(key).state == "committed"  # a day old: kept for 30 days
    engine.dispose()
    assert "event=reload_needs_restart sections=retention" in caplog.text


def test_a_reload_cannot_raise_the_deadline_past_the_running_lease(
    db_url, tmp_path, caplog
) -> None:
    with Simulator(api_keys=[KEY]) as sim:
        config = write_config(tmp_path / "outbox.toml", db_url, sim.target, 30)
        daemon = daemon_from(config)  # lease 60 s (default), deadline 10 s
        text = config.read_text()
        config.write_text(
            text.replace("tls = false", "tls = false\ndeadline = 90.0").replace(
                "poll_interval = 3600.0", "poll_interval = 3600.0\nlease = 120.0"
            )
        )
        with caplog.at_level(logging.ERROR, logger="outbox.daemon"):
            daemon.reload()
        assert daemon.config.recrypt.deadline == 10.0  # kept: the running lease is still 60 s
        assert "event=reload_failed" in caplog.text and "deadline" in caplog.text
        daemon.engine.dispose()
