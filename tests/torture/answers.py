"""The answers issue 10 pinned, as chaos actions; each is counted in ``report.faults``.

- ``refusal``: one method (PlaceOrder, or CancelOrder of an open order) answers
  PERMISSION_DENIED while Recrypt is not in maintenance: the API key may not call it. The
  daemon must hold that method (its rows pending, no attempt counted) for ``[maintenance]
  unauthenticated_probe_interval`` (``HOLD_S``) and then re-probe it with one batch, send every
  other method meanwhile, and release it at once on SIGHUP (sent in about half the windows).
  The chaos thread waits for a quiet moment and stays in the window while it lasts, so what it
  sees there is the daemon's doing; the end checks (``checks.check_refusals``) judge every
  window, whatever else happened.
- ``failed_to_connect_row``: a row whose first call executes and is answered UNAVAILABLE
  "failed to connect to all addresses …" by the server, then more of the same (unexecuted):
  an unknown outcome (same key, ``maybe_executed``), never "never sent". An operator cancel
  without ``--force`` must then be refused; with ``expires_at`` near, the row must end parked
  ``expired_unknown``, never ``expired``.
- ``vgw_db_storm``: DEADLINE_EXCEEDED vgw-db on a run of calls, some executed first.
- ``storm_doomed``: a row whose key gets DEADLINE_EXCEEDED vgw-db on every call (executed at
  the first, or never). Each counts toward ``[retry] max_unknown_attempts``, so the row must
  end parked ``unknown_outcome`` with ``maybe_executed`` after exactly that many. Two at the
  start of every run (``start``), more now and then while there is time for them to run out.

Rate-limit texts with digits and a server-sent "failed to connect" on any row are general
faults (``parts.GENERAL``). Violations seen while running go to ``found``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from random import Random

import sqlalchemy as sa

from outbox.errors import OperatorActionError
from outbox.simulator import CANCEL_ORDER, PLACE_ORDER, TRANSFER, Fault
from tests.torture.daemons import Daemons
from tests.torture.database import Database
from tests.torture.parts import (
    FAILED_TO_CONNECT,
    HOLD_S,
    VGW_DB_DEADLINE,
    WRITES,
    C,
    ChaosFault,
    RefusalWindow,
    Report,
    RowSpec,
    TortureSimulator,
    utcnow,
    wait_until,
)
from tests.torture.writer import Writer, new_key, payload_for

Later = Callable[[float, str, Callable[[], None]], None]
#: A SIGHUP releases a held method at once: its rows are sent again within this (seconds).
#: The hold itself lasts ``HOLD_S`` from the probe, seen by the harness a moment later.
RELEASE_S = 1.2
#: Rows of other methods written while a method is held are sent within this (seconds).
OTHERS_S = 1.5


def gating(code: str, message: str) -> bool:
    """An answer that closes or narrows a daemon's gate (or may: PERMISSION_DENIED)."""
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "NOT_FOUND"):
        return True
    return code == "UNAVAILABLE" and "vgw-db" in message


class Answers:
    """The new fault kinds; ``actions()`` gives them to the chaos thread with their weights."""

    def __init__(
        self,
        rng: Random,
        sim: TortureSimulator,
        db: Database,
        daemons: Daemons,
        writer: Writer,
        doomed: set[str],
        report: Report,
        later: Later,
        note: Callable[[str], None],
        quiet: Callable[[], bool],
        general: list[ChaosFault],
    ) -> None:
        self.rng = rng
        self.sim = sim
        self.db = db
        self.daemons = daemons
        self.writer = writer
        self.doomed = doomed
        self.report = report
        self.later = later
        self.note = note
        self.quiet = quiet
        self.general = general  # the harness's general faults: calm ends them, figures count
        self.windows: list[RefusalWindow] = []
        self.found: list[str] = []
        self.used_orders: set[str] = set()  # orders a CancelOrder row was written for
        self.storm_until = float("inf")  # monotonic: no storm-doomed row after this

    def actions(self) -> dict[str, tuple[Callable[[], None], int]]:
        return {
            "refusal": (self.refusal, 1),
            "failed_to_connect_row": (self.failed_to_connect_row, 3),
            "vgw_db_storm": (self.vgw_db_storm, 2),
            "storm_doomed": (self.storm_doomed, 1),
        }

    def start(self, storm_until: float) -> None:
        """At the start of the run: a storm-doomed row executed at its first call, one never."""
        self.storm_until = storm_until
        for execute in (True, False):
            self._storm_row(execute)

    def calm(self) -> None:
        """After the chaos: at least one refusal window (everything else is quiet now)."""
        if not self.windows:
            self.refusal(tries=1)

    # ---- helpers

    def _spec(self, method: str, kind: str) -> RowSpec:
        via = "api" if self.rng.random() < 0.5 else "sql"
        return self.writer.spec(new_key(self.rng), method, payload_for(self.rng, method), kind, via)

    def _write(self, spec: RowSpec) -> None:
        self.db.insert(spec)
        self.writer.register(spec)

    # ---- DEADLINE_EXCEEDED vgw-db

    def vgw_db_storm(self) -> None:
        """A run of DEADLINE_EXCEEDED vgw-db answers on whatever is sent, some executed first."""
        faults = [
            ChaosFault(
                C.DEADLINE_EXCEEDED,
                VGW_DB_DEADLINE,
                execute=self.rng.random() < 0.5,
                methods=WRITES,
                times=self.rng.randint(1, 4),
            )
            for _ in range(self.rng.randint(2, 5))
        ]
        for fault in faults:
            fault.spared = self.doomed
            self.sim.inject(fault)
            self.general.append(fault)
        self.report.faults["vgw_db_storm"] += 1
        executed = sum(f.times or 0 for f in faults if f.execute)
        total = sum(f.times or 0 for f in faults)
        self.note(f"vgw-db storm: {total} answers, {executed} of them executed first")

    def storm_doomed(self) -> None:
        """A storm-doomed row, while there is time left for its storm to run out."""
        if time.monotonic() < self.storm_until:
            self._storm_row(self.rng.random() < 0.5)

    def _storm_row(self, execute: bool) -> None:
        method = TRANSFER if self.rng.random() < 0.7 else PLACE_ORDER
        kind = "storm_doomed_executed" if execute else "storm_doomed"
        spec = self._spec(method, kind)
        spec.park = "unknown_outcome"
        self.doomed.add(spec.key)  # before the fault and the row exist
        keys = frozenset({spec.key})
        self.sim.inject(Fault(C.DEADLINE_EXCEEDED, VGW_DB_DEADLINE, execute=execute, keys=keys))
        self._write(spec)
        self.report.faults[kind] += 1
        self.note(f"storm-doomed row {spec.index} {spec.key} execute={execute}")

    # ---- a server's "failed to connect" after executing

    def failed_to_connect_row(self) -> None:
        """Executed, answered "failed to connect" by the server; then the same, unexecuted."""
        expires = self.rng.random() < 0.4
        kind = "failed_to_connect_expires" if expires else "failed_to_connect"
        spec = self._spec(TRANSFER if self.rng.random() < 0.7 else PLACE_ORDER, kind)
        keys = frozenset({spec.key})
        self.doomed.add(spec.key)  # general faults spare it: these answers are its own
        self.sim.inject(Fault(C.UNAVAILABLE, FAILED_TO_CONNECT, execute=True, keys=keys, times=1))
        again = None if expires else self.rng.randint(2, 5)  # until it expires
        self.sim.inject(Fault(C.UNAVAILABLE, FAILED_TO_CONNECT, keys=keys, times=again))
        if expires:
            spec.expires_at = utcnow().replace(microsecond=0) + timedelta(
                seconds=self.rng.randint(3, 5)
            )
        self._write(spec)
        self.report.faults[kind] += 1
        self.later(0.3, f"cancel {spec.index}", lambda: self._cancel_after(spec, 20))

    def _cancel_after(self, spec: RowSpec, tries: int) -> None:
        """Once the row executed and waits again: ``cancel`` without --force must be refused."""
        again = tries > 1 and spec.refused is None
        if spec.key not in self.sim.executed_keys():
            if again:
                self.later(0.3, f"cancel {spec.index}", lambda: self._cancel_after(spec, tries - 1))
            return
        try:
            row = self.db.rows_of([spec.key]).get(spec.key)
            if row is None or row["state"] != "pending":
                if again and (row is None or row["state"] == "inflight"):
                    self.later(
                        0.2, f"cancel {spec.index}", lambda: self._cancel_after(spec, tries - 1)
                    )
                return
            why = "torture: cancel after failed to connect"
            self.db.store.cancel(spec.key, "torture@chaos", why, utcnow(), False)
        except OperatorActionError as exc:
            if "may already have executed" in str(exc):
                self.report.extra["failed_to_connect_cancel_refused"] += 1
            elif again:  # claimed meanwhile
                self.later(0.2, f"cancel {spec.index}", lambda: self._cancel_after(spec, tries - 1))
            return
        except sa.exc.DBAPIError as exc:
            self.note(f"cancel {spec.key} failed: {type(exc).__name__}")
            return
        spec.cancelled = True
        self.found.append(
            f"row {spec.index} {spec.key!r} ({spec.kind}): executed at Recrypt, answered "
            "UNAVAILABLE 'failed to connect to all addresses …' by the server, and then "
            f"cancelled without --force (maybe_executed={row['maybe_executed']}): a server's "
            "'failed to connect' after the call started is an unknown outcome"
        )

    # ---- a method refused outside maintenance

    def refusal(self, tries: int = 6) -> None:
        """A refusal window: see the module doc. The chaos thread stays in it till it ends."""
        if tries > 1 and not self.quiet():
            self.later(0.5, "refusal", lambda: self.refusal(tries - 1))
            return
        judged = self.quiet()
        method, rows = self._refused_rows()
        name = method.rsplit("/", 1)[-1]
        message = f"permission denied: this API key may not call {name} (key_access)"
        fault = ChaosFault(C.PERMISSION_DENIED, message, methods=frozenset({method}))
        fault.spared = self.doomed
        window = RefusalWindow(method, message, utcnow())
        self.windows.append(window)
        self.sim.inject(fault)
        sighup = self.rng.random() < 0.5
        held = False
        try:
            for spec in rows:
                self._write(spec)
            keys = {s.key for s in rows}
            self.sim.wait_for(lambda _s: fault.hits >= 1, timeout=3.0)
            held = wait_until(lambda: method in self._held(), 4.0, 0.05)
            # Then a while longer: sometimes past the hold, so the re-probe is refused too.
            end = time.monotonic() + self.rng.uniform(0.5 * HOLD_S, HOLD_S + 1.5)
            if held and sighup:
                self._sighup_releases(window, keys, judged)
            elif held:
                self._others_go_on(window, judged)
            time.sleep(max(0.0, end - time.monotonic()))
            self._untouched(window, rows)
        finally:
            fault.active = False
            window.end = utcnow()
        self.report.faults["refused_method_window"] += 1
        self.report.faults["refused_method_sighup"] += int(held and sighup)
        self.report.extra["refused_calls"] += fault.hits
        self.report.extra["refused_held_seen"] += int(held)
        length = (window.end - window.start).total_seconds()
        self.note(
            f"refusal window {name} {length:.1f}s rows={len(rows)} refused={fault.hits} "
            f"held={held} sighup={held and sighup} judged={judged}"
        )

    def _refused_rows(self) -> tuple[str, list[RowSpec]]:
        """The refused method and 2-4 rows of it: CancelOrders of open orders, or PlaceOrders."""
        count = self.rng.randint(2, 4)
        orders = [
            e
            for e in self.sim.ledger
            if e.method == PLACE_ORDER
            and e.response.get("status") == "ORDER_STATUS_OPEN"
            and e.response.get("order_id") not in self.used_orders
        ]
        if len(orders) >= count and self.rng.random() < 0.4:
            rows = []
            for entry in self.rng.sample(orders, count):
                order_id = str(entry.response["order_id"])
                self.used_orders.add(order_id)
                spec = self._spec(CANCEL_ORDER, "refused_method")
                spec.payload = {"account": entry.request["account"], "orderId": order_id}
                rows.append(spec)
            return CANCEL_ORDER, rows
        return PLACE_ORDER, [self._spec(PLACE_ORDER, "refused_method") for _ in range(count)]

    def _held(self) -> set[str]:
        try:
            return self.db.refused_methods(self.daemons.pids())
        except sa.exc.DBAPIError:
            return set()

    def _clean(self, window: RefusalWindow) -> bool:
        """Nothing but the window's own refusals closed a gate since it opened (and no method
        is removed): what the daemons did is theirs alone to answer for."""
        if not self.quiet():
            return False
        last_reload = max((r.at for r in self.daemons.reloads), default=None)
        for span in self.sim.spans:
            if span.code == "NOT_FOUND" and (last_reload is None or span.start > last_reload):
                return False  # a method removed until the next reload
            own = span.message == window.message
            if span.start > window.start and not own and gating(span.code, span.message):
                return False
        return True

    def _sighup_releases(self, window: RefusalWindow, keys: set[str], judged: bool) -> None:
        """SIGHUP while the method is held: its rows are sent again at once."""
        sent_at = utcnow()
        self.report.extra["reloads"] += self.daemons.reload()
        released = wait_until(
            lambda: any(s.key in keys and s.start > sent_at for s in self.sim.spans),
            RELEASE_S,
            0.05,
        )
        if not released and judged and self._clean(window):
            self.found.append(
                f"refusal of {window.method}: held, then SIGHUP at "
                f"{sent_at:%H:%M:%S.%f}; none of its {len(keys)} pending rows was sent again "
                f"within {RELEASE_S:g}s (a reload releases refused methods at once)"
            )

    def _others_go_on(self, window: RefusalWindow, judged: bool) -> None:
        """While the method is held, rows of another method are sent."""
        others = [self._spec(TRANSFER, "plain") for _ in range(self.rng.randint(2, 3))]
        for spec in others:
            self._write(spec)
        written = time.monotonic()
        keys = {s.key for s in others}
        went = wait_until(lambda: bool(keys & self.sim.executed_keys()), OTHERS_S, 0.05)
        self.report.extra["refused_others_ms"] = max(
            self.report.extra["refused_others_ms"], int((time.monotonic() - written) * 1000)
        )
        if not went and judged and self._clean(window):
            self.found.append(
                f"refusal of {window.method}: while it was held, none of {len(others)} "
                f"Transfer rows written at {utcnow():%H:%M:%S} was sent within {OTHERS_S:g}s "
                "(a method the key may not call holds only that method)"
            )

    def _untouched(self, window: RefusalWindow, rows: list[RowSpec]) -> None:
        """Rows only ever refused are pending (or in flight), no attempt counted, not parked."""
        answers: dict[str, set[tuple[str, str]]] = {s.key: set() for s in rows}
        for span in self.sim.spans:
            if span.key in answers:
                answers[span.key].add((span.code, span.message))
        refusal = {("PERMISSION_DENIED", window.message)}
        only_refused = [s for s in rows if answers[s.key] == refusal]
        try:
            found = self.db.rows_of(s.key for s in only_refused)
        except sa.exc.DBAPIError:
            return
        for spec in only_refused:
            row = found.get(spec.key)
            if row is None:
                continue
            fine = (
                row["state"] in ("pending", "inflight")
                and not row["attempts"]
                and not row["park_reason"]
                and not row["maybe_executed"]
            )
            if not fine:
                self.found.append(
                    f"row {spec.index} {spec.key!r} ({spec.kind}, {window.method}): only ever "
                    f"answered PERMISSION_DENIED (the key may not call it), yet {row['state']}/"
                    f"{row['park_reason']} attempts={row['attempts']} maybe_executed="
                    f"{bool(row['maybe_executed'])}: a refused method's rows wait untouched"
                )
