"""sd_notify against a real datagram socket standing in for systemd: no sleeps, no mocks."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from outbox.systemd import STATUS_MAX_CHARS, Notifier


class Manager:
    """The receiving end: what systemd would read from NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}

    def fields(self) -> dict[str, str]:
        """The next datagram as KEY=VALUE fields (recv with a timeout: never a sleep)."""
        data = self.sock.recv(65536).decode("utf-8")
        return dict(line.split("=", 1) for line in data.split("\n"))

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield Manager(sock, str(path))
    sock.close()


@pytest.fixture
def notifier(manager: Manager) -> Iterator[Notifier]:
    n = Notifier.from_env(manager.env(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid())))
    yield n
    n.close()


def test_ready(manager: Manager, notifier: Notifier) -> None:
    assert notifier.enabled
    assert notifier.ready()
    assert manager.fields() == {"READY": "1"}


def test_ready_with_status_is_one_datagram(manager: Manager, notifier: Notifier) -> None:
    notifier.ready("dispatching")
    assert manager.fields() == {"READY": "1", "STATUS": "dispatching"}


def test_status_is_one_line_and_bounded(manager: Manager, notifier: Notifier) -> None:
    notifier.status("gate maintenance\nprobing every 30 s\r\n")
    assert manager.fields() == {"STATUS": "gate maintenance probing every 30 s"}
    notifier.status("x" * 5000)
    status = manager.fields()["STATUS"]
    assert len(status) == STATUS_MAX_CHARS
    assert status.endswith("…")


def test_watchdog_stopping_extend(manager: Manager, notifier: Notifier) -> None:
    notifier.watchdog()
    assert manager.fields() == {"WATCHDOG": "1"}
    notifier.stopping()
    assert manager.fields() == {"STOPPING": "1"}
    notifier.extend_timeout(2.5)
    assert manager.fields() == {"EXTEND_TIMEOUT_USEC": "2500000"}


def test_reloading_carries_monotonic_usec(manager: Manager, notifier: Notifier) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = manager.fields()
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_abstract_socket() -> None:
    name = f"outbox-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.enabled
        assert n.ready()
        assert sock.recv(100) == b"READY=1"
        n.close()
    finally:
        sock.close()


def test_watchdog_interval_is_half_of_watchdog_usec(notifier: Notifier) -> None:
    assert notifier.watchdog_interval == 15.0


def test_watchdog_usec_without_pid_is_ours(manager: Manager) -> None:
    n = Notifier.from_env(manager.env(WATCHDOG_USEC="4000000"))
    assert n.watchdog_interval == 2.0
    assert n.watchdog()
    assert manager.fields() == {"WATCHDOG": "1"}


def test_watchdog_pid_of_another_process_disables_the_watchdog(manager: Manager) -> None:
    n = Notifier.from_env(manager.env(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid() + 1)))
    assert n.watchdog_interval is None
    assert not n.watchdog()
    assert n.ready()  # the notify socket itself is still ours
    assert manager.fields() == {"READY": "1"}
    assert manager.nothing_pending()


@pytest.mark.parametrize("value", ["", "0", "-5", "soon"])
def test_watchdog_usec_unusable_means_no_watchdog(manager: Manager, value: str) -> None:
    assert Notifier.from_env(manager.env(WATCHDOG_USEC=value)).watchdog_interval is None


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"}])
def test_disabled_without_a_socket(env: dict[str, str]) -> None:
    n = Notifier.from_env({**env, "WATCHDOG_USEC": "30000000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    for call in (n.ready, n.watchdog, n.stopping, n.reloading):
        assert call() is False
    assert n.status("x") is False
    assert n.extend_timeout(1) is False


def test_vanished_socket_warns_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gone.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
    sock.close()
    path.unlink()
    with caplog.at_level(logging.DEBUG, logger="outbox.systemd"):
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.status("still here") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "sd_notify_failed" in warnings[0].getMessage()
    n.close()


def test_close_is_idempotent_and_silences(manager: Manager) -> None:
    n = Notifier.from_env(manager.env())
    n.ready()
    manager.fields()
    n.close()
    n.close()
    assert n.ready() is False
    assert manager.nothing_pending()
