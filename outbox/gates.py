"""The dispatcher's gate: may it send now, how much, and if not, why and until when.

Whole-API answers (SPEC §5) close or narrow the gate; it is pure state over an injected clock,
so every transition is unit-tested without sleeping. Precedence when several apply:
unauthenticated > maintenance > rollover > rate limited > open.

- ``rollover`` (UNAVAILABLE vgw-db): back off exponentially (jitter, cap); when the wait is
  over, let exactly one call through as a probe; on any other answer, reopen and ramp up.
  Calls during a rollover therefore grow with the log of its length, not with the backlog.
  After it, the calls per cycle start at one and double with each clean cycle.
- ``maintenance`` (PERMISSION_DENIED): send nothing; ``Core.MaintenanceCheck`` is probed with
  backoff and reopens the gate when it answers normally.
- ``unauthenticated``: halt; re-probe slowly; a reload (SIGHUP) reopens at once.
- ``unreachable`` (our client could not connect: network down, DNS, TLS handshake): like
  rollover, back off and probe one call at a time; nothing is counted, nothing parks.
- ``rate_limited`` (RESOURCE_EXHAUSTED): halve the calls per cycle and pause briefly; each clean
  cycle doubles them back.
- Removed methods (NOT_FOUND) are not sent again until restart or reload.
- The rollover window holds ``hold_methods`` (market orders by default).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, time, timedelta

from outbox.backoff import Backoff
from outbox.vocabulary import Gate, GateState

OPEN = GateState.OPEN


@dataclass(frozen=True)
class GateView:
    """What status, logs and metrics show."""

    gate: str  # a GateState value
    reason: str | None
    until: datetime | None
    limit: int  # calls allowed per cycle now (0 = none)
    removed_methods: tuple[str, ...]
    held_methods: tuple[str, ...]
    refused_methods: tuple[str, ...] = ()  # PERMISSION_DENIED outside maintenance: the key
    since: datetime | None = None  # when the current closure began (None: open)


class Gates:
    def __init__(
        self,
        backoff: Backoff,
        max_in_flight: int,
        *,
        unauthenticated_probe: float = 300.0,
        maintenance_probe: float = 60.0,
        window: tuple[int, time, time] | None = None,
        hold_methods: tuple[str, ...] = (),
        rng: random.Random | None = None,
    ) -> None:
        self._backoff = backoff
        self._max = max_in_flight
        self._unauth_probe = unauthenticated_probe
        self._maint_backoff = Backoff(
            initial=min(5.0, maintenance_probe), maximum=maintenance_probe, jitter=backoff.jitter
        )
        self._window = window
        self._hold = hold_methods
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._gate: str = OPEN
        self._reason: str | None = None
        self._until: datetime | None = None
        self._level = 0  # consecutive closures of the current gate
        self._reserved = 0  # calls granted to dispatch cycles under way
        # What Core.MaintenanceCheck last said of this week's rollover (None: not asked yet).
        self._scheduled: bool | None = None
        self._reported: tuple[datetime, datetime] | None = None
        self._limit = max_in_flight
        self._removed: set[str] = set()
        self._denied: set[str] = set()  # methods that answered PERMISSION_DENIED this pause
        self._refused: dict[str, datetime] = {}  # method → when to try it again
        self._since: datetime | None = None
        self._listeners: list[Callable[[GateView], None]] = []

    # ---- asking

    def allowance(self, now: datetime) -> int:
        """How many calls the dispatcher may start now (0: none)."""
        with self._lock:
            return self._allowance_locked(now)

    def _allowance_locked(self, now: datetime) -> int:
        if self._gate in (Gate.UNAUTHENTICATED, Gate.MAINTENANCE):
            return 0
        if self._until is not None and now < self._until:
            return 0
        if self._gate in (Gate.ROLLOVER, Gate.UNREACHABLE):
            return 1  # one probe at a time (acquire() shares it between cycles)
        return self._limit

    def acquire(self, now: datetime, want: int) -> int:
        """Reserve up to ``want`` calls for one cycle; cycles running in parallel share the
        allowance, so ``max_in_flight`` and "one probe at a time" hold across them.

        Checking the allowance and reserving from it is one critical section: two loops can
        never both take the single rollover probe."""
        with self._lock:
            granted = max(0, min(want, self._allowance_locked(now) - self._reserved))
            self._reserved += granted
        return granted

    def release(self, granted: int) -> None:
        with self._lock:
            self._reserved -= granted

    def excluded_methods(self, now: datetime) -> tuple[str, ...]:
        with self._lock:
            held = self._hold if self._holding(now) else ()
            return tuple(sorted(self._removed)) + held + self._refused_now(now)

    def in_window(self, now: datetime) -> bool:
        """Inside the configured weekly window (UTC)?"""
        if self._window is None:
            return False
        day, start, end = self._window
        return now.weekday() == day and start <= now.time() < end

    def on_schedule(self, scheduled: bool, window: tuple[datetime, datetime] | None = None) -> None:
        """Core.MaintenanceCheck said whether rollover downtime is scheduled this week."""
        with self._lock:
            self._scheduled, self._reported = scheduled, window

    def _holding(self, now: datetime) -> bool:
        """Hold ``hold_methods``: in the window Recrypt reported, or in the configured window
        unless Recrypt said no downtime is scheduled this week (unknown counts as scheduled)."""
        if self._reported is not None and self._reported[0] <= now < self._reported[1]:
            return True
        return self.in_window(now) and self._scheduled is not False

    def needs_probe(self, now: datetime) -> bool:
        """Maintenance or a refused key: is it time to call Core.MaintenanceCheck?"""
        with self._lock:
            closed = self._gate in (Gate.MAINTENANCE, Gate.UNAUTHENTICATED)
            return closed and (self._until is None or now >= self._until)

    def view(self, now: datetime) -> GateView:
        with self._lock:
            return self._view_locked(now)

    # ---- telling

    def on_answer(self, gate: Gate, now: datetime, message: str = "") -> GateView | None:
        """Fold one call's whole-API effect (``Gate.NONE`` for a normal answer) into the gate;
        the new view when that changed the gate (its listeners have heard it), else None."""
        with self._lock:
            before = (self._gate, self._reason)
            self._fold(gate, now, message)
            changed = (self._gate, self._reason) != before
            view = self._view_locked(now)
        if not changed:
            return None
        self._notify(view)
        return view

    def remove_method(self, path: str) -> None:
        with self._lock:
            self._removed.add(path)

    def confirm_maintenance(self) -> None:
        """Recrypt is in maintenance: the methods refused meanwhile are not the key's fault."""
        with self._lock:
            self._denied.clear()

    def method_denied(self, path: str) -> None:
        """A method answered PERMISSION_DENIED: maintenance, unless the probe says otherwise."""
        with self._lock:
            self._denied.add(path)

    def on_probe(
        self,
        ok: bool,
        now: datetime,
        gate: Gate | None = None,
        message: str = "",
        *,
        maintenance: bool | None = None,
    ) -> None:
        """A MaintenanceCheck answered: ``ok`` reopens, otherwise wait for the next probe.

        A failed probe keeps the current gate (re-armed with backoff) unless it revealed a
        stronger one (a maintenance probe answered UNAUTHENTICATED, say). ``maintenance`` is
        what the check said of maintenance mode (None: it could not tell): True means the
        refusals were maintenance; False, on the first probe, means they were not.
        """
        if maintenance is not False:
            self.confirm_maintenance()  # (or unknown: never hold a method on a guess)
        if ok:
            self._refuse_denied(now)
            self.on_answer(Gate.NONE, now)
            return
        with self._lock:
            current = self._gate if isinstance(self._gate, Gate) else Gate.MAINTENANCE
            if current == Gate.UNAUTHENTICATED and gate not in (None, Gate.UNAUTHENTICATED):
                self._open()  # the key was accepted: what the probe revealed replaces the halt
                current = gate
        stronger = gate is not None and gate_rank(gate) > gate_rank(current)
        self.on_answer(gate if stronger and gate else current, now, message)

    def reset(self, now: datetime) -> None:
        """A reload (SIGHUP): forget every closure, removed and refused method; try again."""
        with self._lock:
            self._open()
            self._removed.clear()
            self._refused.clear()
            view = self._view_locked(now)
        self._notify(view)

    def subscribe(self, listener: Callable[[GateView], None]) -> None:
        self._listeners.append(listener)

    def _refuse_denied(self, now: datetime) -> None:
        """Recrypt says there is no maintenance, yet these methods were refused: the key may
        not call them. Hold them (a slow re-probe, or a reload); everything else goes on."""
        with self._lock:
            if self._gate == Gate.MAINTENANCE:
                until = now + timedelta(seconds=self._unauth_probe)
                self._refused.update(dict.fromkeys(self._denied, until))
            self._denied.clear()

    # ---- internals (lock held)

    def _refused_now(self, now: datetime) -> tuple[str, ...]:
        return tuple(sorted(m for m, until in self._refused.items() if now < until))

    def _fold(self, gate: Gate, now: datetime, message: str) -> None:
        if gate == Gate.NONE:
            self._clear_after_success()
            return
        if gate == Gate.METHOD_REMOVED:
            return  # handled per method by remove_method()
        if gate_rank(gate) < gate_rank(self._gate):
            return  # a stronger gate is closed already
        self._level = self._level + 1 if self._gate == gate else 1
        if self._gate != gate:
            self._since = now
        self._gate = gate
        self._reason = _REASONS[gate] + (f" (Recrypt said: {message})" if message else "")
        self._until = now + timedelta(seconds=self._wait(gate))
        if gate == Gate.RATE_LIMITED:
            self._limit = max(1, self._limit // 2)

    def _wait(self, gate: Gate) -> float:
        if gate == Gate.UNAUTHENTICATED:
            return self._unauth_probe
        if gate == Gate.MAINTENANCE:
            return self._maint_backoff.delay(self._level, self._rng)
        if gate == Gate.RATE_LIMITED:
            return min(self._backoff.initial * self._level, self._backoff.maximum)
        return self._backoff.delay(self._level, self._rng)

    def _clear_after_success(self) -> None:
        if self._gate == Gate.RATE_LIMITED and self._until is not None:
            self._limit = min(self._max, self._limit * 2)
            if self._limit < self._max:
                return
        if self._gate in (Gate.ROLLOVER, Gate.UNREACHABLE):
            self._open()
            self._limit = 1  # ramp back up: double per clean cycle (slow start)
        elif self._gate != OPEN:
            self._open(keep_limit=self._gate == Gate.RATE_LIMITED)
        elif self._limit < self._max:
            self._limit = min(self._max, self._limit * 2)

    def _open(self, keep_limit: bool = False) -> None:
        self._gate, self._reason, self._until, self._since = OPEN, None, None, None
        self._level = 0
        self._denied.clear()  # refusals of an earlier pause never hold a method later
        if not keep_limit:
            self._limit = self._max

    def _view_locked(self, now: datetime) -> GateView:
        closed = self._gate in (Gate.UNAUTHENTICATED, Gate.MAINTENANCE)
        waiting = self._until is not None and now < self._until
        probing = self._gate in (Gate.ROLLOVER, Gate.UNREACHABLE)
        limit = 0 if closed or waiting else (1 if probing else self._limit)
        return GateView(
            gate=str(self._gate),
            reason=self._reason,
            until=self._until,
            limit=limit,
            removed_methods=tuple(sorted(self._removed)),
            held_methods=self._hold if self._holding(now) else (),
            refused_methods=self._refused_now(now),
            since=self._since,
        )

    def _notify(self, view: GateView) -> None:
        for listener in self._listeners:
            listener(view)


_RANK: dict[str, int] = {
    OPEN: 0,
    Gate.RATE_LIMITED: 1,
    Gate.UNREACHABLE: 2,
    Gate.ROLLOVER: 2,
    Gate.MAINTENANCE: 3,
    Gate.UNAUTHENTICATED: 4,
}

#: Every state a gate can be in, "open" first (the vocabulary's ``GateState``).
GATE_STATES: tuple[str, ...] = tuple(GateState)
#: Gates under which nothing is sent but, at most, one probe call at a time: ``/readyz`` answers
#: 503 and ``outbox_sending_blocked`` is 1 (rate limited still sends, fewer at a time).
SENDS_NOTHING: frozenset[str] = frozenset(
    {Gate.UNREACHABLE, Gate.ROLLOVER, Gate.MAINTENANCE, Gate.UNAUTHENTICATED}
)
_REASONS = {
    Gate.UNREACHABLE: "cannot connect to Recrypt (network or TLS): backing off, one probe at "
    "a time; check the network path, [recrypt] target and ca_file",
    Gate.RATE_LIMITED: "rate limited by Recrypt: fewer calls per cycle",
    Gate.ROLLOVER: "rollover maintenance (UNAVAILABLE vgw-db): backing off, one probe at a time",
    Gate.MAINTENANCE: "Recrypt maintenance mode (PERMISSION_DENIED): paused, probing "
    "Core.MaintenanceCheck; updates at https://x.com/RecryptCS",
    Gate.UNAUTHENTICATED: "API key refused (UNAUTHENTICATED): halted; check the key and its IP "
    "allow-list at recrypt.net/api, then `systemctl reload outbox` (SIGHUP)",
}


def gate_rank(gate: str) -> int:
    """Which gate wins when several apply (0: none, or a per-method one such as NOT_FOUND)."""
    return _RANK.get(gate, 0)
