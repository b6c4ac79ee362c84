"""``outbox simulator``: serve a ``Simulator`` until SIGINT/SIGTERM, applying a control file.

The command line's side of the simulator: ``main_serve`` (what ``outbox simulator`` runs) and
``ControlFile`` (re-read the control file when it changes). Nothing here is used by a
``Simulator`` itself; no other part of ``outbox.simulator`` may import this module.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from outbox.descriptors import Catalog
from outbox.simulator.faults import Control, Fault
from outbox.simulator.model import Status, positive_decimal
from outbox.simulator.server import DEFAULT_API_KEYS, Simulator

POLL_SECONDS = 0.5  # how often the serve loop looks at the control file and the stop signal


class ControlFile:
    """Re-read a control file when it changes and apply it to a running simulator."""

    def __init__(self, path: str | os.PathLike[str], sim: Simulator) -> None:
        self.path = Path(path)
        self._sim = sim
        self._keys = sim.api_keys()
        self._seen: tuple[float, int] | None = None

    def poll(self) -> str | None:
        """Apply the file if it changed; returns what to report (None: nothing new)."""
        try:
            stat = self.path.stat()
        except OSError as exc:
            return None if self._seen == (-1, -1) else self._missing(exc)
        if self._seen == (stat.st_mtime, stat.st_size):
            return None
        self._seen = (stat.st_mtime, stat.st_size)
        try:
            control = Control.parse(self.path.read_text(encoding="utf-8"), str(self.path))
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            return f"{exc}; keeping the previous settings"
        self._apply(control)
        return f"applied {control.lines} line" + ("" if control.lines == 1 else "s")

    def _missing(self, exc: OSError) -> str:
        self._seen = (-1, -1)
        return f"{self.path}: {exc.strerror}; keeping the previous settings"

    def _apply(self, control: Control) -> None:
        sim = self._sim
        sim.clear_faults()
        for fault in control.faults:
            sim.inject(fault)
        sim.set_maintenance(control.maintenance)
        sim.set_rollover(*control.rollover)
        sim.set_api_keys(control.keys if control.keys is not None else self._keys)


def main_serve(
    listen: str,
    api_keys: list[str],
    faults: list[str],
    transfer_limit: str,
    proto_path: str | None,
    *,
    control: str | None = None,
) -> None:
    """``outbox simulator``: serve until SIGINT/SIGTERM, then stop cleanly; with ``control``,
    apply that file (``ControlFile``) at start and whenever it changes.

    ``api_keys`` empty means the default test key. ``faults`` are ``Fault.parse`` specs;
    a bad spec or limit raises ``ValueError`` before anything listens.
    """
    sim = _configured(api_keys, faults, transfer_limit, proto_path)
    with _stop_on_signals() as stop:
        try:
            port = sim.start(listen)
            host = listen.rpartition(":")[0] or "0.0.0.0"  # noqa: S104
            _say(f"simulator listening on {host}:{port} (plaintext)")
            _serve_until(stop, ControlFile(control, sim) if control else None)
        finally:
            sim.stop(grace=1.0)


def _configured(
    api_keys: list[str], faults: list[str], transfer_limit: str, proto_path: str | None
) -> Simulator:
    """A simulator with the command line's settings; a bad one raises ``ValueError``."""
    parsed = [Fault.parse(spec) for spec in faults]
    try:
        limit = positive_decimal(transfer_limit, "transfer limit")
    except Status as exc:
        raise ValueError(exc.message) from None
    sim = Simulator(Catalog.load(proto_path), api_keys or DEFAULT_API_KEYS, transfer_limit=limit)
    for fault in parsed:
        sim.inject(fault)
    return sim


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event SIGINT/SIGTERM set while the block runs; the previous handlers come back."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_until(stop: threading.Event, watcher: ControlFile | None) -> None:
    while True:
        said = watcher.poll() if watcher else None
        if said:
            _say(f"simulator control: {said}")
        if stop.wait(POLL_SECONDS):
            return


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
