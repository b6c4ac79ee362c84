"""PostgreSQL wake-ups: LISTEN on the channel the insert trigger notifies (migration 0002).

The trigger is statement-level and PostgreSQL folds identical notifications of one
transaction into one, so a writer inserting a thousand rows in a transaction sends a single
NOTIFY. The listener holds one dedicated autocommit connection, reconnects with backoff, and
calls ``wake`` after every (re)connect as well, in case a notification was missed meanwhile.
Polling stays the fallback: a lost notification delays a row by at most the poll interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import URL

from outbox.backoff import Backoff
from outbox.logs import kv

CHANNEL = "outbox_messages"
log = logging.getLogger("outbox.listener")


class Listener:
    def __init__(self, url: URL, wake: Callable[[], None], backoff: Backoff) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._wake = wake
        self._backoff = backoff
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-listener", daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._listen()
                failures = 0
            except psycopg.Error as exc:
                failures += 1
                self.connected.clear()
                delay = self._backoff.delay(failures)
                log.warning(
                    kv("listener_reconnect", error=type(exc).__name__, delay=round(delay, 1))
                )
                self._stop.wait(delay)

    def _listen(self) -> None:
        with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.connected.set()
            self._wake()  # anything inserted while we were not listening
            while not self._stop.is_set():
                for _notify in conn.notifies(timeout=1.0, stop_after=1):
                    self._wake()
