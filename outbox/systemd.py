"""The sd_notify protocol, standard library only: tell systemd we are ready, alive, stopping.

Why no ``python-systemd``: it needs libsystemd headers to build, and the protocol is one
datagram of ``KEY=VALUE`` lines sent to ``$NOTIFY_SOCKET`` (see sd_notify(3)). Outside systemd
(tests, a terminal, a container) ``NOTIFY_SOCKET`` is unset and every method is a no-op, so
the daemon calls them unconditionally.

Every send is best-effort: systemd going away, or a socket we may not write to, must never
take the outbox down with it. The first failure is logged at warning level, later ones at
debug level (a watchdog ping every few seconds would otherwise flood the journal).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

from outbox.logs import kv

log = logging.getLogger("outbox.systemd")

# systemctl shows STATUS= on one line; a longer text is noise (and a datagram has limits).
STATUS_MAX_CHARS = 200
# A send must never stall the daemon: if systemd's receive queue is full, give up quickly.
SEND_TIMEOUT_SECONDS = 1.0


class Notifier:
    """Sends sd_notify messages over one ``AF_UNIX``/``SOCK_DGRAM`` socket kept open.

    Build it with :meth:`from_env` (reads ``NOTIFY_SOCKET``, ``WATCHDOG_USEC``,
    ``WATCHDOG_PID``); the constructor takes the already-parsed values so tests can too.
    Thread-safe: the watchdog may be pinged from a scheduler thread while the main thread
    reports status.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """``address``: a filesystem path, or ``"\\0name"`` for an abstract socket."""
        self._address = address
        self._watchdog_usec = watchdog_usec if address else None
        self._sock: socket.socket | None = None
        # Reentrant: a Python signal handler runs in the main thread between bytecodes, and
        # one that notifies while the main thread holds the lock must not deadlock.
        self._lock = threading.RLock()
        self._warned = False
        self._closed = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """Read the variables systemd sets for ``Type=notify`` and ``WatchdogSec=``.

        ``WATCHDOG_PID`` names the process the watchdog is meant for: when it is set to
        another PID (a child that inherited our environment, or the other way round) the
        watchdog is not ours and :meth:`watchdog` stays silent.
        """
        env = os.environ if env is None else env
        address = _parse_address(env.get("NOTIFY_SOCKET", ""))
        return cls(address, _parse_watchdog(env) if address else None)

    # ---- what the daemon reads

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` pings (half of ``WatchdogSec=``), or None.

        Half, as sd_watchdog_enabled(3) advises: one late ping must not get us killed.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    # ---- messages

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete: ``systemctl start``/``reload`` returns now."""
        return self._send("READY=1", *_status_line(status))

    def status(self, text: str) -> bool:
        """One line for ``systemctl status``: newlines would start a new protocol field."""
        return self._send(*_status_line(text))

    def watchdog(self) -> bool:
        """Ping the watchdog; a no-op unless systemd set one up for this very process."""
        if self._watchdog_usec is None:
            return False
        return self._send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun: systemd shows "deactivating" instead of a hung service."""
        return self._send("STOPPING=1", *_status_line(status))

    def reloading(self) -> bool:
        """A reload has begun; follow it with :meth:`ready` when it is done.

        systemd >= 253 (``Type=notify-reload``) pairs ``RELOADING=1`` with the
        ``MONOTONIC_USEC`` it was sent at, to tell this reload from an earlier one; older
        versions ignore the extra field.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before a start/stop timeout kills us (slow hand-back)."""
        usec = max(int(seconds * 1_000_000), 1)
        return self._send(f"EXTEND_TIMEOUT_USEC={usec}")

    def close(self) -> None:
        """Close the socket; later sends are no-ops. Safe to call twice."""
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    # ---- plumbing

    def _send(self, *fields: str) -> bool:
        """One datagram of ``\\n``-separated fields; True when it was handed to the kernel."""
        if self._address is None or not fields:
            return False
        message = "\n".join(fields).encode("utf-8")
        try:
            with self._lock:
                if self._closed:
                    return False
                self._socket().sendto(message, self._address)
        except OSError as exc:
            self._failed(exc)
            return False
        return True

    def _socket(self) -> socket.socket:
        """The socket, opened on first use (held lock): no socket at all outside systemd."""
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.settimeout(SEND_TIMEOUT_SECONDS)
            self._sock = sock
        return self._sock

    def _failed(self, exc: OSError) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(
            level,
            kv(
                "sd_notify_failed",
                socket=_shown(self._address),
                error=f"{type(exc).__name__}: {exc.strerror or exc}",
                effect="systemd may not see readiness or watchdog pings; the outbox keeps going",
            ),
        )


def _parse_address(value: str) -> str | None:
    """``/path`` or ``@abstract`` (sd_notify(3)); anything else is not a socket we speak to."""
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    log.warning(
        kv(
            "sd_notify_unsupported",
            socket=value,
            effect="NOTIFY_SOCKET is not a path or @abstract name: notifications are off",
        )
    )
    return None


def _parse_watchdog(env: Mapping[str, str]) -> int | None:
    """``WATCHDOG_USEC`` when it is a positive integer meant for this process, else None."""
    pid = env.get("WATCHDOG_PID", "").strip()
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "").strip())
    except ValueError:
        return None
    return usec if usec > 0 else None


def _status_line(text: str | None) -> tuple[str, ...]:
    """``STATUS=…`` as one line of at most STATUS_MAX_CHARS characters; nothing for None."""
    if text is None:
        return ()
    line = " ".join(text.split())
    if len(line) > STATUS_MAX_CHARS:
        line = line[: STATUS_MAX_CHARS - 1] + "…"
    return (f"STATUS={line}",)


def _shown(address: str | None) -> str:
    if address is None:
        return ""
    return "@" + address[1:] if address.startswith("\0") else address
