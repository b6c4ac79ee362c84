"""The answers issue 10 pinned, as chaos actions; each is counted in ``report.faults``.

- ``refusal``: one method (PlaceOrder, or CancelOrder of an open order) answers
  PERMISSION_DENIED while Recrypt is not in maintenance: the API key may not call it. The
  daemon must hold that method (its rows pending, no attempt counted) for ``[maintenance]
  unauthenticated_probe_interval`` (``HOLD_S``) and then re-probe it with one batch, send every
  other method meanwhile (judged when nothing else closed a gate), hold nothing it was not
  refused since its last SIGHUP, and release the method at once on SIGHUP. A third of the
  windows send that SIGHUP while the method is held; a third start with Transfer refused once
  and a SIGHUP before the daemon's probe (the reload must forget it). The chaos thread waits
  for a quiet moment (every daemon up, its gate open) and stays in the window while it lasts,
  so what it sees there is the daemon's doing; the end checks (``promises.refused_methods_held``)
  judge every window's refusals, whatever else happened.
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
faults (``faults.GENERAL``). Violations seen while running go to ``found``.

Injected by ``chaos``: must not import the chaos loop nor the checks (``promises``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import timedelta
from random import Random

import sqlalchemy as sa

from outbox.clock import utcnow
from outbox.errors import OperatorActionError
from outbox.simulator import CANCEL_ORDER, PLACE_ORDER, TRANSFER, Fault
from tests.torture.daemons import Daemons
from tests.torture.database import Database
from tests.torture.faults import FAILED_TO_CONNECT, VGW_DB_DEADLINE, ChaosFault, UnknownBudget
from tests.torture.observed import RefusalWindow
from tests.torture.simulator import TortureSimulator
from tests.torture.vocabulary import HOLD_S, WRITES, C, Report, RowSpec, wait_until
from tests.torture.writers import Writer, new_key, payload_for

Later = Callable[[float, str, Callable[[], None]], None]
#: A SIGHUP releases a held method at once: its rows are sent again within this (seconds).
#: The hold itself lasts ``HOLD_S`` from the probe, seen by the harness a moment later.
RELEASE_S = 1.2
#: Rows of other methods written while a method is held are sent within this (seconds).
OTHERS_S = 1.5


def refused_since_reload(log: str) -> set[str]:
    """Methods a daemon's log shows refused (handed back on PERMISSION_DENIED) since its last
    reload (``event=reloaded``), or since it started."""
    refused: set[str] = set()
    for line in log.splitlines():
        if "event=reloaded" in line:
            refused.clear()
        elif "event=handed_back" in line and "code=PERMISSION_DENIED" in line:
            found = re.search(r" method=(\S+)", line)
            if found:
                refused.add(found.group(1))
    return refused


def gating(code: str, message: str) -> bool:
    """An answer that closes or narrows a daemon's gate (or may: PERMISSION_DENIED)."""
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND"):
        return True
    if code == "RESOURCE_EXHAUSTED":
        return not message.strip().isdigit()  # a bare number parks the row, no gate
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
        budget: UnknownBudget,
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
        self.budget = budget  # unknown outcomes general faults may give one key
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
        """After the chaos: at least one refusal window in which the daemons held the method
        (a window can miss: its method removed by a NOT_FOUND, say). Everything is quiet now."""
        for _ in range(2):
            if self.report.extra["refused_held_seen"]:
                return
            wait_until(self._ready, 30.0)
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
            fault.spared, fault.budget = self.doomed, self.budget
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

    def refusal(self, tries: int = 20) -> None:
        """A refusal window: see the module doc. The chaos thread stays in it till it ends."""
        if not self._ready():
            if tries > 1:
                self.later(0.5, "refusal", lambda: self.refusal(tries - 1))
            else:
                self.note("refusal window skipped: no quiet moment")
            return
        if self._removed():  # the operator reloads after a NOT_FOUND (as the settle phase does)
            self.report.extra["reloads"] += self.daemons.reload()
            time.sleep(0.5)  # taken in before the window opens
        # The general faults still to answer wait till the window ends (then they answer).
        paused = [f for f in self.general if f.active and not f.exhausted]
        for fault in paused:
            fault.active = False
        try:
            mode = self.rng.choice(["sighup", "forgotten", "plain"])
            if mode == "forgotten":
                self._forgotten_refusal()
            self._window(mode)
        finally:
            for fault in paused:
                fault.active = True

    def _window(self, mode: str) -> None:
        method, rows = self._refused_rows()
        name = method.rsplit("/", 1)[-1]
        message = f"permission denied: this API key may not call {name} (key_access)"
        fault = ChaosFault(C.PERMISSION_DENIED, message, methods=frozenset({method}))
        fault.spared = self.doomed
        window = RefusalWindow(method, message, utcnow())
        self.windows.append(window)
        self.sim.inject(fault)
        held = stale = False
        try:
            for spec in rows:
                self._write(spec)
            keys = {s.key for s in rows}
            if self.sim.wait_for(lambda _s: fault.hits >= 1, timeout=3.0):
                # The daemon holds it once its next MaintenanceCheck says "no maintenance".
                held = wait_until(lambda: method in self._held(), 2.5, 0.05)
                stale = self._stale_holds(window)
            # Then a while longer: sometimes past the hold, so the re-probe is refused too.
            end = time.monotonic() + (self.rng.uniform(0.5, 1.5) * HOLD_S if held else 0.0)
            if held and mode == "sighup":
                self._sighup_releases(window, keys)
            elif held and not stale:  # (a stale hold of Transfer is reported already)
                self._others_go_on(window)
            time.sleep(max(0.0, end - time.monotonic()))
            self._untouched(window, rows)
        finally:
            fault.active = False
            window.end = utcnow()
        self.report.faults["refused_method_window"] += 1
        self.report.faults["refused_method_sighup"] += int(held and mode == "sighup")
        self.report.extra["refused_calls"] += fault.hits
        self.report.extra["refused_held_seen"] += int(held)
        length = (window.end - window.start).total_seconds()
        self.note(
            f"refusal window {name} from {window.start:%H:%M:%S.%f} for {length:.1f}s rows="
            f"{[s.index for s in rows]} refused={fault.hits} held={held} mode={mode}"
        )

    def _forgotten_refusal(self) -> None:
        """Before a window: Transfer refused once, then a SIGHUP before the daemon's probe.
        The reload forgets that refusal (Transfer is answered OK again meanwhile), so the
        window's probe must not hold Transfer with its own method (``_stale_holds``)."""
        message = "permission denied: this API key may not call Transfer (key_access)"
        fault = ChaosFault(C.PERMISSION_DENIED, message, methods=frozenset({TRANSFER}), times=1)
        fault.spared = self.doomed
        self.sim.inject(fault)
        self._write(self._spec(TRANSFER, "plain"))
        answered = wait_until(
            lambda: any(s.message == message and s.answered for s in self.sim.spans), 2.5, 0.05
        )
        if answered:
            time.sleep(0.1)  # its answer taken in; the probe is 0.7 s or more away
            self.report.extra["reloads"] += self.daemons.reload()
            self.report.faults["refused_then_reloaded"] += 1
            time.sleep(0.5)
        fault.active = False

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

    def _up(self) -> bool:
        """Quiet, and every daemon running, started and not stopping: nothing but the window
        holds calls back (the chaos thread, which restarts daemons, waits in the window)."""
        slots = self.daemons.slots
        up = all(s.proc is not None and s.proc.poll() is None and not s.stopping for s in slots)
        return up and all(self.daemons.is_started(s) for s in slots) and self.quiet()

    def _ready(self) -> bool:
        """Up, and each daemon says its gate is open: a window can start."""
        if not self._up():
            return False
        workers = self._workers()
        return len(workers) == len(self.daemons.slots) and all(
            gate == "open" for gate, _m in workers.values()
        )

    def _workers(self) -> dict[int, tuple[str, set[str]]]:
        try:
            return self.db.workers(self.daemons.pids())
        except sa.exc.DBAPIError:
            return {}

    def _held_by(self) -> dict[int, set[str]]:
        """What each running daemon (by process id) holds as refused, as it reports it."""
        return {pid: refused for pid, (_gate, refused) in self._workers().items()}

    def _held(self) -> set[str]:
        return {method for methods in self._held_by().values() for method in methods}

    def _stale_holds(self, window: RefusalWindow) -> bool:
        """A daemon holds only methods refused to it since its last SIGHUP (by its own log):
        a reload forgets every refusal, and a method answered since is not the key's fault.
        True if one holds more."""
        held, stale = self._held_by(), False
        for slot in self.daemons.running():
            assert slot.proc is not None
            others = held.get(slot.proc.pid, set()) - {window.method}
            if not others or slot.log is None:
                continue
            refused = refused_since_reload(slot.log.read_text(errors="replace"))
            for method in sorted(others - refused):
                stale = True
                self.found.append(
                    f"refusal of {window.method}: daemon {slot.index}-{slot.generation} also "
                    f"holds {method} as refused (outbox_workers.refused_methods), yet no call of "
                    f"it was refused since the daemon's last SIGHUP ({slot.log.name}): a reload "
                    "forgets refusals, and only a refusal the probe found unexplained holds"
                )
        return stale

    def _removed(self, method: str | None = None) -> bool:
        """A NOT_FOUND (for ``method``, or any) answered since the last SIGHUP: the daemons do
        not send that method now (a call sent before a reload may be answered after it)."""
        last_reload = max((r.at for r in self.daemons.reloads), default=None)
        return any(
            s.code == "NOT_FOUND"
            and (method is None or s.method == method)
            and (last_reload is None or s.end > last_reload)
            for s in self.sim.spans
        )

    def _unclean(self, window: RefusalWindow, method: str) -> str | None:
        """Why the daemons may have held ``method``'s calls back for their own reasons in the
        window (None: nothing but the window's own refusals closed a gate since it opened, and
        ``method`` is not removed, so what they did is theirs alone to answer for)."""
        if not self._up():
            return "a daemon is down, or the chaos is not quiet"
        if self._removed(method):
            return f"{method} removed (NOT_FOUND)"
        for s in self.sim.spans:
            if s.end <= window.start or s.message == window.message or s.code == "NOT_FOUND":
                continue
            if gating(s.code, s.message):
                return f"{s.code} {s.message!r} at {s.start:%H:%M:%S.%f}"
        return None

    def _sighup_releases(self, window: RefusalWindow, keys: set[str]) -> None:
        """SIGHUP while the method is held: its rows are sent again at once."""
        sent_at = utcnow()
        self.report.extra["reloads"] += self.daemons.reload()
        released = wait_until(
            lambda: any(s.method == window.method and s.start > sent_at for s in self.sim.spans),
            RELEASE_S,
            0.05,
        )
        why = None if released else self._unclean(window, window.method)
        if not released and why is None:
            self.found.append(
                f"refusal of {window.method}: held, then SIGHUP at "
                f"{sent_at:%H:%M:%S.%f}; no call of it (its {len(keys)} rows pending) came "
                f"within {RELEASE_S:g}s (a reload releases refused methods at once)"
            )
        elif why is not None:
            self.note(f"refusal of {window.method}: SIGHUP release not judged: {why}")

    def _others_go_on(self, window: RefusalWindow) -> None:
        """While the method is held, rows of another method (not removed) are sent."""
        others = [m for m in (TRANSFER, PLACE_ORDER) if m != window.method]
        other = next((m for m in others if not self._removed(m)), None)
        if other is None:
            self.note(f"refusal of {window.method}: other methods not judged: all removed")
            return
        rows = [self._spec(other, "plain") for _ in range(self.rng.randint(2, 3))]
        for spec in rows:
            self._write(spec)
        written, at = time.monotonic(), utcnow()
        keys = {s.key for s in rows}
        went = wait_until(lambda: bool(keys & self.sim.executed_keys()), OTHERS_S, 0.05)
        self.report.extra["refused_others_ms"] = max(
            self.report.extra["refused_others_ms"], int((time.monotonic() - written) * 1000)
        )
        why = None if went else self._unclean(window, other)
        if not went and why is None:
            self.found.append(
                f"refusal of {window.method}: while it was held, none of {len(rows)} "
                f"{other.rsplit('/', 1)[-1]} rows written at {at:%H:%M:%S.%f} was sent within "
                f"{OTHERS_S:g}s (a method the key may not call holds only that method)"
            )
        elif why is not None:
            self.note(f"refusal of {window.method}: other methods not judged: {why}")

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
