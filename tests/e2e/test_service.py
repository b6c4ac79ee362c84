"""``outbox run`` as a service: sd_notify on a real socket, SIGTERM mid-batch, metrics, secrets.

The daemon runs as a real process (``python -m outbox.cli run``) against the in-process
simulator. The systemd side is played by a datagram socket bound in a short /tmp directory
(``AF_UNIX`` paths are limited to ~107 bytes); the monitoring side by urllib on
``[metrics] listen``. Everything synchronises on datagrams, HTTP answers, simulator events and
database state, each with a timeout.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from outbox.database import make_engine
from outbox.simulator import Fault
from outbox.store import RowView, Store
from tests.e2e.test_process import API_KEY, all_committed, enqueue_many, wait_until, write_config

pytestmark = pytest.mark.slow

OK = grpc.StatusCode.OK
WATCHDOG_USEC = 1_000_000  # WatchdogSec=1s: the daemon must ping more often than that
FIELD = re.compile(r"^[A-Z_]+=.*$")


# --------------------------------------------------------------------------- fixtures, helpers


class NotifySocket:
    """What systemd listens on for ``Type=notify``: every datagram received, in order."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[tuple[float, list[str]]] = []  # (monotonic time, fields)

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def recv(self, timeout: float) -> list[str] | None:
        """The next datagram's fields (``KEY=VALUE`` lines), or None after ``timeout``."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        fields = data.decode("utf-8").split("\n")
        self.received.append((time.monotonic(), fields))
        return fields

    def wait_for(self, field: str, timeout: float) -> list[str] | None:
        """Receive until a datagram holds ``field`` (e.g. ``READY=1``); None on timeout."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            fields = self.recv(left)
            if fields is not None and field in fields:
                return fields
        return None

    def drain(self) -> list[list[str]]:
        """Everything already queued, without waiting."""
        out = []
        while (fields := self.recv(0.001)) is not None:
            out.append(fields)
        return out

    def times_of(self, field: str) -> list[float]:
        return [at for at, fields in self.received if field in fields]


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    listener = NotifySocket()
    yield listener
    listener.close()


def configure(
    config: Path,
    *,
    deadline: float = 5.0,
    lease: float | None = None,
    listen: str = "",
    extra: str = "",
) -> Path:
    """Adjust ``write_config``'s file: the Recrypt deadline, the lease (it must outlive the
    deadline: twice the deadline unless given), ``[metrics] listen``, more keys at the end."""
    text = config.read_text()
    for name, value in (
        ("deadline", f"{deadline}"),
        ("lease", f"{lease or 2 * deadline}"),
        ("listen", json.dumps(listen)),
    ):
        text, found = re.subn(rf"(?m)^{name} = .*$", f"{name} = {value}", text)
        assert found == 1, f"write_config's file has no single {name} key:\n{text}"
    config.write_text(text + extra)
    return config


def spawn(
    config: Path, log: Path, *, env: dict[str, str] | None = None, drop: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    full = os.environ | {"RECRYPT_API_KEY": API_KEY} | (env or {})
    for name in ("OUTBOX_DATABASE_URL", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", *drop):
        if name not in (env or {}):
            full.pop(name, None)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "outbox.cli", "--config", str(config), "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def rows(url: str, keys: list[str]) -> list[RowView]:
    engine = make_engine(url)
    try:
        store = Store(engine)
        return [store.get(k) for k in keys]
    finally:
        engine.dispose()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    """(status, body); a connection refused (not listening yet) is status 0."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8")
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def metric(body: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` with ``labels`` in a /metrics body, or None if absent."""
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None


# --------------------------------------------------------------------------- 1. sd_notify


def test_notify_ready_watchdog_hang_and_stopping(sqlite_url, sim, notify, tmp_path) -> None:
    config = configure(write_config(tmp_path, sqlite_url, sim.target), deadline=60.0)
    log = tmp_path / "daemon.log"
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    proc = spawn(config, log, env=env)
    release = threading.Event()
    try:
        ready = notify.wait_for("READY=1", timeout=30)
        assert ready is not None, log.read_text()
        assert any(f.startswith("STATUS=") for f in ready)  # "dispatching to …"

        # Idle, the dispatch cycles keep the watchdog fed: well within WatchdogSec each time.
        for _ in range(4):
            assert notify.wait_for("WATCHDOG=1", timeout=5) is not None, log.read_text()
        pings = notify.times_of("WATCHDOG=1")
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps

        # A dispatch cycle that hangs inside a call (deadline 60 s) stops the pings.
        hang = sim.inject(Fault(OK, hang=release))
        (key,) = enqueue_many(sqlite_url, 1)
        assert sim.wait_for(lambda s: hang.hits >= 1, timeout=30), log.read_text()
        notify.drain()  # pings sent before the hung cycle began
        quiet_until = time.monotonic() + 2.5 * WATCHDOG_USEC / 1e6
        while (left := quiet_until - time.monotonic()) > 0:
            fields = notify.recv(left)
            assert fields is None or "WATCHDOG=1" not in fields, "pinged while hung"

        # Released, the cycle finishes, the row commits and the pings resume.
        release.set()
        assert notify.wait_for("WATCHDOG=1", timeout=10) is not None, log.read_text()
        assert wait_until(lambda: all_committed(sqlite_url, [key]), 30), log.read_text()
        assert notify.wait_for("WATCHDOG=1", timeout=5) is not None

        proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING=1", timeout=30)
        assert stopping is not None, log.read_text()
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        release.set()
        stop(proc)
    notify.drain()
    every = [f for _, fields in notify.received for f in fields]
    assert all(FIELD.match(f) for f in every), every  # STATUS= never spills onto a new line
    statuses = [f for f in every if f.startswith("STATUS=")]
    assert statuses and all(1 < len(s) <= len("STATUS=") + 200 for s in statuses), statuses
    # READY comes once (no reload happened) and before STOPPING.
    ready_at, stop_at = notify.times_of("READY=1"), notify.times_of("STOPPING=1")
    assert len(ready_at) == 1 and len(stop_at) == 1 and ready_at[0] < stop_at[0]


def test_unmigrated_database_fails_before_ready(sim, notify, tmp_path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    config = configure(write_config(tmp_path, f"sqlite:///{empty}", sim.target))
    log = tmp_path / "daemon.log"
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    proc = spawn(config, log, env=env)
    try:
        code = proc.wait(timeout=60)
    finally:
        stop(proc)
    output = log.read_text()
    assert code != 0, output
    assert "schema" in output and "outbox db upgrade" in output
    assert "Traceback" not in output
    sent = [f for fields in notify.drain() for f in fields]
    assert "READY=1" not in sent, sent
    assert sim.call_count() == 0  # nothing was sent to Recrypt either


# --------------------------------------------------------------------------- 2. SIGTERM


def test_sigterm_mid_batch_exits_zero_then_restart_commits_each_key_once(
    db_url, sim, tmp_path
) -> None:
    keys = enqueue_many(db_url, 30)
    held = frozenset(keys[:5])  # in the first batch of 20: the cycle waits for them
    release = threading.Event()
    hang = sim.inject(Fault(OK, keys=held, hang=release))
    config = configure(write_config(tmp_path, db_url, sim.target), deadline=2.0)
    log = tmp_path / "daemon.log"
    first = spawn(config, log)
    try:
        assert sim.wait_for(lambda s: hang.hits >= len(held), timeout=30), log.read_text()
        signalled = time.monotonic()
        first.send_signal(signal.SIGTERM)
        code = first.wait(timeout=15)  # the 2 s deadline plus start-up slack, far under 30 s
        took = time.monotonic() - signalled
    finally:
        release.set()  # the held calls now execute at Recrypt; their answers reach no one
        stop(first)
    output = log.read_text()
    assert code == 0, output
    assert took < 15, took
    assert "event=stopped" in output
    after_stop = {r.idempotency_key: r for r in rows(db_url, keys)}
    assert {r.state for r in after_stop.values()} <= {"pending", "committed"}  # none held
    assert all(after_stop[k].state == "pending" and after_stop[k].maybe_executed for k in held)

    assert sim.wait_for(lambda s: held <= s.executed_keys(), timeout=10)
    sim.clear_faults()
    second = spawn(config, log)
    try:
        assert wait_until(lambda: all_committed(db_url, keys), 60), log.read_text()
    finally:
        assert stop(second) == 0, log.read_text()
    assert {k: sim.executions(k) for k in keys} == dict.fromkeys(keys, 1)
    assert API_KEY not in log.read_text()


# --------------------------------------------------------------------------- 3. metrics


def test_metrics_health_and_readiness(sqlite_url, sim, tmp_path) -> None:
    keys = enqueue_many(sqlite_url, 6)
    base = f"http://127.0.0.1:{free_port()}"
    config = configure(write_config(tmp_path, sqlite_url, sim.target), listen=base[7:])
    log = tmp_path / "daemon.log"
    proc = spawn(config, log)
    try:
        assert wait_until(lambda: all_committed(sqlite_url, keys), 30), log.read_text()
        assert wait_until(lambda: http_get(base + "/healthz")[0] == 200, 30), log.read_text()
        status, body = http_get(base + "/metrics")
        assert status == 200
        assert metric(body, "outbox_outcomes_total", outcome="committed") == len(keys)
        assert metric(body, "outbox_attempts_total", code="OK") == len(keys)
        assert (metric(body, "outbox_submit_seconds_count") or 0) >= len(keys)
        assert metric(body, "outbox_gate", gate="open") == 1
        assert metric(body, "outbox_gate", gate="unauthenticated") == 0
        assert http_get(base + "/healthz") == (200, "ok\n")
        status, body = http_get(base + "/readyz")
        assert status == 200, body
        assert http_get(base + "/nope")[0] == 404
    finally:
        assert stop(proc) == 0, log.read_text()


def test_readyz_is_503_while_the_api_key_is_refused(sqlite_url, sim, tmp_path) -> None:
    enqueue_many(sqlite_url, 2)
    key_file = tmp_path / "api-key"
    key_file.write_text("not-the-key\n")
    key_file.chmod(0o600)
    base = f"http://127.0.0.1:{free_port()}"
    config = configure(
        write_config(tmp_path, sqlite_url, sim.target),
        listen=base[7:],
        extra="unauthenticated_probe_interval = 600.0\n",
    )
    config.write_text(
        config.read_text().replace("tls = false", f"tls = false\napi_key_file = '{key_file}'")
    )
    log = tmp_path / "daemon.log"
    proc = spawn(config, log, drop=("RECRYPT_API_KEY",))
    try:
        assert wait_until(lambda: http_get(base + "/readyz")[0] == 503, 30), log.read_text()
        status, body = http_get(base + "/readyz")
        assert status == 503
        assert "API key" in body, body
        assert http_get(base + "/healthz")[0] == 200  # alive, just not useful
        metrics = http_get(base + "/metrics")[1]
        assert metric(metrics, "outbox_gate", gate="unauthenticated") == 1
        assert "not-the-key" not in body + metrics
    finally:
        assert stop(proc) == 0, log.read_text()
    assert "not-the-key" not in log.read_text()


# --------------------------------------------------------------------------- 4. secrets


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"RECRYPT_API_KEY": API_KEY}
    env.pop("OUTBOX_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "outbox.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_the_api_key_never_leaks(sqlite_url, sim, tmp_path) -> None:
    keys = enqueue_many(sqlite_url, 5)
    parked, retried = keys[0], keys[1]
    code = grpc.StatusCode
    sim.inject(Fault(code.FAILED_PRECONDITION, "over the limit", keys=frozenset([parked])))
    sim.inject(Fault(code.UNAVAILABLE, "vgw-db", execute=True, keys=frozenset([retried]), times=1))
    base = f"http://127.0.0.1:{free_port()}"
    config = configure(
        write_config(tmp_path, sqlite_url, sim.target),
        listen=base[7:],
        extra='[logging]\nlevel = "DEBUG"\n',
    )
    log = tmp_path / "daemon.log"
    proc = spawn(config, log)
    outputs: dict[str, str] = {}
    try:

        def settled() -> bool:
            states = {r.idempotency_key: r.state for r in rows(sqlite_url, keys)}
            return states == {k: "parked" if k == parked else "committed" for k in keys}

        assert wait_until(settled, 30), log.read_text()
        assert wait_until(lambda: http_get(base + "/readyz")[0] == 200, 30), log.read_text()
        outputs["/metrics"] = http_get(base + "/metrics")[1]
        outputs["/readyz"] = http_get(base + "/readyz")[1]
        for args in (
            ("status", "--json"),
            ("list", "--json"),
            ("show", parked, "--json"),
            ("show", retried, "--json"),
            ("check",),
        ):
            done = cli(config, *args)
            outputs[" ".join(args)] = done.stdout + done.stderr
            assert "Traceback" not in done.stderr, done.stderr
            if args[-1] == "--json":
                assert done.returncode == 0, done.stderr
                json.loads(done.stdout)
        assert cli(config, "check").returncode == 1  # a parked row is a warning
    finally:
        assert stop(proc) == 0, log.read_text()
    outputs["daemon log"] = log.read_text()
    # The scenario really happened: a park, a retry, a commit on ALREADY_EXISTS.
    shown = json.loads(cli(config, "show", retried, "--json").stdout)
    assert "ALREADY_EXISTS" in json.dumps(shown)
    assert "event=parked" in outputs["daemon log"]
    assert "event=retry_scheduled" in outputs["daemon log"]
    assert metric(outputs["/metrics"], "outbox_outcomes_total", outcome="parked") == 1
    leaked = [where for where, text in outputs.items() if API_KEY in text]
    assert leaked == [], f"the API key appears in: {leaked}"
