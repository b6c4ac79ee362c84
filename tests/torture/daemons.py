"""``outbox run`` processes for the torture run: start, SIGKILL, SIGTERM, SIGHUP, watch.

Each process gets its own API key (``API_KEY-<slot>-<generation>``, accepted by the simulator),
so a call at the simulator names the process that sent it; ``killed_at`` says when each was
SIGKILLed (an answer it received before then may have died with it).

Part of the world (``world``): must not import the chaos, the writers nor the checks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from outbox.clock import utcnow
from tests.torture.observed import Reload
from tests.torture.vocabulary import (
    API_KEY,
    DEADLINE_S,
    HOLD_S,
    LEASE_S,
    MAX_BACKOFF_S,
    MAX_UNKNOWN,
    POLL_S,
    Report,
    wait_until,
)


@dataclass
class Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    generation: int = 0
    started: bool = False  # "event=started" seen: signal handlers are installed
    stopping: bool = False  # SIGTERM sent by the harness: it is meant to exit (with 0)
    start_failures: int = 0
    api_key: str = API_KEY


class Daemons:
    """``outbox run`` processes, one log file per process."""

    def __init__(
        self,
        config: Path,
        workdir: Path,
        count: int,
        report: Report,
        allow_key: Callable[[str], None],
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.slots = [Slot(i) for i in range(count)]
        self.report = report
        self.allow_key = allow_key
        self.env = os.environ | {"RECRYPT_API_KEY": API_KEY}
        self.env.pop("OUTBOX_DATABASE_URL", None)
        self.killed_at: dict[str, datetime] = {}
        self.reloads: list[Reload] = []  # every SIGHUP sent, to whom
        self.lock = threading.Lock()

    def start(self, slot: Slot) -> None:
        slot.generation += 1
        slot.started = slot.stopping = False
        slot.api_key = f"{API_KEY}-{slot.index}-{slot.generation}"
        self.allow_key(slot.api_key)
        slot.log = self.workdir / f"daemon{slot.index}-{slot.generation}.log"
        with slot.log.open("ab") as out:
            slot.proc = subprocess.Popen(
                [sys.executable, "-m", "outbox.cli", "--config", str(self.config), "run"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env | {"RECRYPT_API_KEY": slot.api_key} | traced(slot.index),
            )

    def is_started(self, slot: Slot) -> bool:
        if not slot.started and slot.log is not None and slot.proc is not None:
            slot.started = slot.proc.poll() is None and "event=started" in slot.log.read_text(
                errors="replace"
            )
        return slot.started

    def running(self) -> list[Slot]:
        return [s for s in self.slots if s.proc is not None and s.proc.poll() is None]

    def kill(self, slot: Slot) -> None:
        assert slot.proc is not None
        slot.proc.send_signal(signal.SIGKILL)
        slot.proc.wait(timeout=30)
        self.killed_at[slot.api_key] = utcnow()
        slot.proc = None
        self.report.kills += 1

    def stop(self, slot: Slot) -> None:
        """SIGTERM: the daemon finishes its calls, records them, hands back, exits 0.

        ``check`` starts it again once it has exited.
        """
        assert slot.proc is not None
        slot.stopping = True
        slot.proc.send_signal(signal.SIGTERM)

    def reload(self) -> int:
        """SIGHUP every daemon whose handlers are installed (before that, SIGHUP kills)."""
        callers = []
        for slot in self.running():
            if self.is_started(slot) and not slot.stopping:
                assert slot.proc is not None
                slot.proc.send_signal(signal.SIGHUP)
                callers.append(slot.api_key)
        if callers:
            with self.lock:
                self.reloads.append(Reload(utcnow(), frozenset(callers)))
        return len(callers)

    def pids(self) -> set[int]:
        """Process ids of the daemons running now (``outbox_workers.pid``)."""
        return {s.proc.pid for s in self.running() if s.proc is not None}

    def check(self) -> None:
        """A daemon that exited by itself: a violation once started; else a start failure.

        A daemon the harness stopped must have exited 0. Either way it is started again (as
        systemd would).
        """
        for slot in self.slots:
            proc = slot.proc
            if proc is None or proc.poll() is None:
                continue
            tail = _tail(slot.log)
            if slot.stopping:
                if proc.returncode != 0:
                    self.report.violations.append(
                        f"daemon {slot.index} (generation {slot.generation}) exited "
                        f"{proc.returncode} on SIGTERM: {tail}"
                    )
            elif slot.started:
                self.report.violations.append(
                    f"daemon {slot.index} (generation {slot.generation}) exited by itself "
                    f"with {proc.returncode}: {tail}"
                )
            else:
                slot.start_failures += 1
                self.report.extra["start_failures"] += 1
                if slot.start_failures > 20:
                    self.report.violations.append(
                        f"daemon {slot.index} crash-loops at start: {tail}"
                    )
                    slot.proc = None
                    continue
            self.start(slot)
            self.report.restarts += 1

    def stop_all(self) -> None:
        """SIGTERM every daemon, each once its handlers are installed: a daemon restarted in
        the settle phase may still be starting, and SIGTERM before that kills it (-15)."""
        wait_until(lambda: all(self.is_started(s) for s in self.running()), 30)
        for slot in self.running():
            assert slot.proc is not None
            slot.proc.send_signal(signal.SIGTERM)
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:
                code = slot.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                code = slot.proc.wait()
            if code != 0:
                self.report.violations.append(
                    f"daemon {slot.index} exited {code} on SIGTERM: {_tail(slot.log)}"
                )
            slot.proc = None

    def kill_all(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()
                slot.proc.wait()
                self.killed_at[slot.api_key] = utcnow()


def _tail(log: Path | None, lines: int = 8) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])


def write_config(
    workdir: Path,
    url: str,
    target: str,
    max_unknown: int = MAX_UNKNOWN,
    max_backoff: float = MAX_BACKOFF_S,
) -> Path:
    path = workdir / "outbox.toml"
    path.write_text(
        f"""
[database]
url = "{url}"
[recrypt]
target = "{target}"
tls = false
deadline = {DEADLINE_S}
[worker]
batch_size = 20
max_in_flight = 20
poll_interval = {POLL_S}
lease = {LEASE_S}
[retry]
initial_backoff = 0.1
max_backoff = {max_backoff}
jitter = 0.3
max_unknown_attempts = {max_unknown}
[maintenance]
probe_interval = 1.0
unauthenticated_probe_interval = {HOLD_S}
rollover_window = ""
[metrics]
listen = ""
[retention]
days = 0
"""
    )
    return path


#: Where the even daemons send their spans: a port nothing listens on (the collector is down).
DEAD_COLLECTOR = "http://127.0.0.1:9"


def traced(index: int) -> dict[str, str]:
    """Daemon ``index``'s OpenTelemetry settings: the even ones trace every attempt (and parse
    every row's traceparent, garbage included) to a collector that is down, which must cost
    them nothing but the spans; the odd ones do not trace."""
    if index % 2:
        return {"OTEL_SDK_DISABLED": "true"}
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": DEAD_COLLECTOR,
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
    }
