"""The promises, checked at the end of a run; each function returns one line per violation.

What they read: the table (``Table``: the rows, and those a retention run purged, as they
were just before), what happened at Recrypt (``Observed``: the simulator's ledger of effects
and its spans of calls, plus when the harness SIGKILLed each daemon) and the row specs.

- ``check_rows``: every row ends where its kind says (committed once, parked for the right
  reason, behind a parked row in its lane, expired unexecuted, refused at INSERT where that
  is allowed, cancelled unexecuted); nothing executed twice or with another payload; nothing
  that executed ends ``expired``, or ``cancelled`` without ``--force``; a lane whose parked
  head an operator finished (``lanes``: cancelled, requeued, or cancelled by hand) moves on:
  no row of it is left pending with no open row before it ("waits behind a finished row").
- ``check_lanes``: in a lane, calls in id order among rows both visible; never two rows of a
  lane in flight at the simulator at once.
- ``check_calls``: each key reaches one method with one request, however often it is sent.
- ``check_responses``: a committed row whose OK answer reached its daemon keeps that response.
- ``check_history``: every answer the daemons recorded is read as the policy table says
  (PERMISSION_DENIED and rate limiting, digits or not, handed back uncounted; a bare number
  parks ``object_limit``; a server's "failed to connect" and DEADLINE_EXCEEDED vgw-db are
  unknown outcomes), and no row commits as "key used before" (every key here is new).
- ``check_refusals``: a method refused outside maintenance is held for ``HOLD_S`` by the
  daemon that saw it refused, unless a SIGHUP released it or the daemon could not know.

``check_rows`` also holds: a call that executed and was answered an error leaves its row
``maybe_executed``; rows a storm dooms end parked ``unknown_outcome`` after exactly
``max_unknown_attempts`` unknown outcomes; a row parks ``object_limit`` only for a number.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, Protocol

from google.protobuf import json_format

from outbox.descriptors import Catalog, build_request
from outbox.simulator import LedgerEntry
from tests.torture.parts import (
    BAD_KINDS,
    DEADLINE_S,
    EDITED_PARK_REASONS,
    FINAL,
    HOLD_S,
    KEY_REUSED,
    MAX_UNKNOWN,
    OPEN,
    Probe,
    RefusalWindow,
    Reload,
    RowSpec,
    Span,
)

MAX_PER_LANE = 3  # violation lines per lane and kind: the first few tell the story
MAX_ALIKE = 5  # violation lines of one shape (rows left open, say): then a count
SIGNAL = timedelta(seconds=0.5)  # a daemon acts on a signal within this


class Simulated(Protocol):
    """What ``Observed.of`` reads from the simulator."""

    @property
    def ledger(self) -> list[LedgerEntry]: ...

    @property
    def spans(self) -> list[Span]: ...

    @property
    def probes(self) -> list[Probe]: ...


@dataclass
class Observed:
    """What happened at Recrypt, and what the harness did to it and to the daemons.

    ``killed_at``: when the harness SIGKILLed which daemon (by API key); ``reloads``: the
    SIGHUPs it sent; ``sim_stops``: when the simulator was down; ``windows``: the methods it
    had Recrypt refuse (PERMISSION_DENIED outside maintenance), and when.
    """

    ledger: list[LedgerEntry]
    spans: list[Span] = field(default_factory=list)
    killed_at: dict[str, datetime] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)
    reloads: list[Reload] = field(default_factory=list)
    sim_stops: list[tuple[datetime, datetime]] = field(default_factory=list)
    windows: list[RefusalWindow] = field(default_factory=list)

    @classmethod
    def of(cls, sim: Simulated, killed_at: dict[str, datetime]) -> Observed:
        return cls(sim.ledger, sim.spans, dict(killed_at), sim.probes)

    @cached_property
    def counts(self) -> Counter[str]:
        return Counter(entry.key for entry in self.ledger)

    @cached_property
    def entries(self) -> dict[str, LedgerEntry]:
        """The first effect of each key."""
        first: dict[str, LedgerEntry] = {}
        for entry in self.ledger:
            first.setdefault(entry.key, entry)
        return first

    @cached_property
    def position(self) -> dict[str, int]:
        """Each executed key's place in the order of effects."""
        return {key: i for i, key in enumerate(self.entries)}

    @cached_property
    def first_call(self) -> dict[str, datetime]:
        first: dict[str, datetime] = {}
        for span in self.spans:
            if span.key not in first or span.start < first[span.key]:
                first[span.key] = span.start
        return first

    @cached_property
    def by_key(self) -> dict[str, list[Span]]:
        found: dict[str, list[Span]] = defaultdict(list)
        for span in self.spans:
            found[span.key].append(span)
        return found

    def executions(self, key: str) -> int:
        return self.counts[key]


@dataclass
class Table:
    """The rows at the end, by key, the rows retention purged (by key, oldest first), and the
    attempt history of the rows still there: each answer recorded, each lease expiry (by key,
    in order; ``code``, ``decision``, ``message``)."""

    rows: dict[str, dict[str, Any]]
    purged: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def row(self, spec: RowSpec) -> dict[str, Any] | None:
        gone = self.purged.get(spec.key, [])
        if spec.reused_from is None:
            return gone[0] if gone else self.rows.get(spec.key)
        live = self.rows.get(spec.key)
        if live is not None:
            return live
        return gone[1] if len(gone) > 1 else None


def in_id_order(specs: Iterable[RowSpec], table: Table) -> list[RowSpec]:
    """Specs by their row's id (insertion order), those without a row last."""

    def place(spec: RowSpec) -> tuple[float, int]:
        row = table.row(spec)
        return (float(row["id"]) if row and row.get("id") is not None else float("inf"), spec.index)

    return sorted(specs, key=place)


def refusable(spec: RowSpec) -> bool:
    """Rows the database (or ``enqueue``) may refuse outright rather than park later."""
    return spec.kind in BAD_KINDS or spec.kind.startswith("poison_") or spec.kind == "key_reuse"


def label(spec: RowSpec) -> str:
    return f"row {spec.index} {spec.key!r} ({spec.kind}, {spec.via}, lane={spec.lane})"


def expected_request(spec: RowSpec, catalog: Catalog) -> dict[str, Any]:
    method = catalog.submittable(spec.method)
    request = build_request(method, spec.payload, spec.key)
    result: dict[str, Any] = json_format.MessageToDict(request, preserving_proto_field_name=True)
    return result


def settled(specs: list[RowSpec], table: Table) -> list[str]:
    """Keys not yet where they can stay: not final, parked, nor pending behind a parked row."""
    parked_lanes: set[str] = set()
    waiting = []
    for spec in in_id_order(specs, table):
        if spec.refused is not None:
            continue
        row = table.row(spec)
        if row is None:
            waiting.append(spec.key)
            continue
        state = row["state"]
        if state == "parked" and spec.lane:
            parked_lanes.add(spec.lane)
        if state in FINAL or state in ("parked", "purged"):
            continue
        if state == "pending" and spec.lane in parked_lanes:
            continue
        waiting.append(spec.key)
    return waiting


def check(
    specs: list[RowSpec],
    table: Table,
    observed: Observed,
    catalog: Catalog,
    max_unknown: int = MAX_UNKNOWN,
) -> list[str]:
    """Every promise; returns one line per violation. ``max_unknown``: the daemons'
    ``[retry] max_unknown_attempts``."""
    ordered = in_id_order(specs, table)
    return (
        check_rows(ordered, table, observed, catalog, max_unknown)
        + check_lanes(ordered, observed)
        + check_calls(ordered, observed)
        + check_responses(ordered, table, observed, catalog)
        + check_history(ordered, table)
        + check_refusals(observed)
    )


def condense(lines: list[str], keep: int = MAX_ALIKE) -> list[str]:
    """At most ``keep`` lines of each shape (the same text but for rows, keys and numbers)."""
    seen: Counter[str] = Counter()
    out = []
    for line in lines:
        shape = _shape(line)
        seen[shape] += 1
        if seen[shape] <= keep:
            out.append(line)
    out += [f"... and {n - keep} more like: {shape}" for shape, n in seen.items() if n > keep]
    return out


def _shape(line: str) -> str:
    line = re.sub(r"row \d+ '[^']*' \([^)]*\)", "row N (...)", line)
    line = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<uuid>", line)
    line = re.sub(r"vm:\d+:[0-9a-f]+|[\w.-]+:\d+:[0-9a-f]{8}", "<worker>", line)
    return re.sub(r"\d+", "#", line)


# --------------------------------------------------------------------------- rows


def check_rows(  # noqa: PLR0912 (one branch per kind of row)
    specs: list[RowSpec],
    table: Table,
    observed: Observed,
    catalog: Catalog,
    max_unknown: int = MAX_UNKNOWN,
) -> list[str]:
    bad: list[str] = []
    blocked: set[str] = set()  # lanes with an (expected) parked row
    behind: Counter[str] = Counter()  # lane rows held behind an unexpectedly parked row
    stuck: set[str] = set()  # lanes with an unexpectedly parked row
    waiting = _waiting_behind_finished(specs, table)
    for spec in specs:
        row = table.row(spec)
        # A reused key executed for the row it first belonged to, never for this one.
        runs = observed.executions(spec.key) if spec.reused_from is None else 0
        name = label(spec)
        if spec.refused is not None:
            if not refusable(spec):
                bad.append(f"{name}: the database refused its INSERT: {spec.refused}")
            continue
        if row is None:
            bad.append(f"{name}: lost (not in the table)")
            continue
        state, reason, maybe = row["state"], row["park_reason"], bool(row["maybe_executed"])
        seen = f"{state}/{reason} maybe_executed={maybe} executions={runs} last={row['last_code']}"
        if runs > 1:
            bad.append(f"{name}: executed {runs} times")
        if state == "purged":
            continue  # purged by retention before its final state was read
        bad += _dropped_execution(name, row, runs, seen)
        if spec.reused_from is None:
            bad += _executed_then_errored(name, row, observed.by_key.get(spec.key, []))
        if spec.key in waiting:
            bad.append(f"{name}: {waiting[spec.key]}: {seen}")
            continue
        if spec.lane in stuck and state == "pending" and not runs:
            behind[spec.lane] += 1  # a consequence, reported once per lane below
            continue
        if spec.lane and spec.lane in blocked:
            if state != "pending" or runs:
                bad.append(f"{name}: behind a parked row, must stay pending unexecuted: {seen}")
            continue
        spans, lines = observed.by_key.get(spec.key, []), table.history.get(spec.key, [])
        problem = _end_state(spec, row, runs, seen, spans, lines, max_unknown)
        if spec.park is not None and spec.lane and spec.unblocked is None:
            blocked.add(spec.lane)
        elif problem and state == "parked" and spec.lane:
            stuck.add(spec.lane)
        if problem:
            bad.append(f"{name}: {problem}")
        if runs and spec.key in observed.entries and isinstance(spec.payload, dict):
            bad += _executed_as_written(name, spec, observed.entries[spec.key], catalog)
    bad += [
        f"lane {lane}: {n} rows held pending behind its unexpectedly parked row"
        for lane, n in sorted(behind.items())
    ]
    strangers = set(observed.counts) - {s.key for s in specs}
    if strangers:
        bad.append(f"keys executed that no row has: {sorted(strangers)[:5]}")
    sent = set(observed.by_key) | {e.key for e in observed.ledger}
    for spec in specs:
        unsendable = spec.kind in BAD_KINDS or spec.kind.startswith("poison_")
        if unsendable and ({spec.key, spec.key.lower()} & sent):
            bad.append(f"bad row {spec.index} {spec.key!r} ({spec.kind}) was sent")
    return bad


def _end_state(  # noqa: PLR0911 (one answer per kind of row)
    spec: RowSpec,
    row: dict[str, Any],
    runs: int,
    seen: str,
    spans: list[Span] | None = None,
    history: list[dict[str, Any]] | None = None,
    max_unknown: int = MAX_UNKNOWN,
) -> str | None:
    """What is wrong with where ``spec``'s row ended, or None.

    ``spans``: the calls with its key at the simulator; ``history``: its recorded answers.
    """
    state, reason, maybe = row["state"], row["park_reason"], bool(row["maybe_executed"])
    if spec.reused_from is not None:
        return _reuse_end(spec, state, reason, seen)
    if spec.kind == "method_edit":
        return _edit_end(spec, state, reason, runs, seen)
    if spec.cancelled or spec.unblocked is not None:
        return _operator_end(spec, state, runs, seen)
    if spec.kind.startswith("storm_doomed"):
        return _storm_end(spec, row, runs, seen, spans or [], history or [], max_unknown)
    if spec.kind.startswith("failed_to_connect"):
        return _failed_to_connect_end(spec, row, runs, seen)
    if spec.park is not None:
        if state != "parked" or reason != spec.park or runs:
            return f"must be parked {spec.park} unexecuted, is {seen}: {row['last_message']}"
        return None
    if spec.kind == "expires":
        fine = (
            (state == "committed" and runs == 1)
            or (state == "expired" and runs == 0)
            or (state == "parked" and reason == "expired_unknown" and maybe)
        )
        return None if fine else f"expiring row ended {seen}"
    if state == "parked" and reason == "object_limit":
        said = sorted({s.message for s in spans or [] if s.code == "RESOURCE_EXHAUSTED"})
        return (
            f"parked object_limit, but Recrypt's RESOURCE_EXHAUSTED answers to it were {said}, "
            "none a bare number: any other text, digits or not, is rate limiting (handed back, "
            f"throttled, no attempt counted); {seen}"
        )
    if state == "parked" and reason == "unknown_outcome":
        unknown = row.get("unknown_attempts", "?")
        return (
            f"parked unknown_outcome after {row['attempts']} attempts ({unknown} counted as "
            f"unknown outcomes; limit {max_unknown}) although no storm doomed it: only unknown "
            f"outcomes (not rollover retries nor gate hand-backs) count; {seen}"
        )
    if state != "committed" or runs != 1:
        return f"must be committed once, is {seen}: {row['last_message']}"
    return None


def _waiting_behind_finished(specs: list[RowSpec], table: Table) -> dict[str, str]:
    """Rows (by key) of a lane whose parked head an operator finished that are still pending
    with no open row before them in their lane: nothing holds them back any more.

    ``specs`` in id order. The head itself is judged by ``_operator_end``.
    """
    heads = {s.lane: s for s in specs if s.lane and s.unblocked}
    open_lanes: set[str] = set()  # lanes with an open row so far
    found = {}
    for spec in specs:
        row = table.row(spec) if spec.refused is None else None
        if row is None or not spec.lane:
            continue
        head = heads.get(spec.lane)
        free = spec.lane not in open_lanes
        if head is not None and head is not spec and row["state"] == "pending" and free:
            found[spec.key] = (
                f"waits behind a finished row (its lane's parked head was finished: row "
                f"{head.index}, {head.unblocked}; no earlier row of the lane is open)"
            )
        if row["state"] in OPEN:
            open_lanes.add(spec.lane)
    return found


def _operator_end(spec: RowSpec, state: str, runs: int, seen: str) -> str | None:
    """A row an operator finished. Cancelled (no ``--force``), it stays cancelled unexecuted;
    a parked lane head requeued with its fault cleared commits once; one cancelled (through
    the store or by hand) stays cancelled unexecuted."""
    if spec.unblocked is None:
        if state != "cancelled" or runs:
            return f"cancelled by an operator (no --force), must stay cancelled unexecuted: {seen}"
        return None
    if spec.unblocked == "requeue":
        if state != "committed" or runs != 1:
            return f"parked lane head requeued (fault cleared): must be committed once, is {seen}"
        return None
    if state != "cancelled" or runs:
        return (
            f"parked lane head cancelled ({spec.unblocked}): must stay cancelled unexecuted, "
            f"is {seen}"
        )
    return None


def _storm_end(
    spec: RowSpec,
    row: dict[str, Any],
    runs: int,
    seen: str,
    spans: list[Span],
    history: list[dict[str, Any]],
    max_unknown: int,
) -> str | None:
    """DEADLINE_EXCEEDED vgw-db on every call: parked ``unknown_outcome`` with maybe_executed
    after exactly max_unknown_attempts unknown outcomes; executed once if the storm executes
    its first call, else never."""
    storms = [s for s in spans if s.code == "DEADLINE_EXCEEDED" and "vgw-db" in s.message]
    counted = [line for line in history if _counted_unknown(line)]
    what = f"DEADLINE_EXCEEDED vgw-db on every call ({len(storms)} calls so answered)"
    if row["state"] != "parked" or row["park_reason"] != "unknown_outcome":
        return (
            f"{what}: must end parked unknown_outcome after max_unknown_attempts ({max_unknown}) "
            f"unknown outcomes, is {seen}: {row['last_message']}"
        )
    if not row["maybe_executed"]:
        return f"{what}: parked unknown_outcome without maybe_executed: {seen}"
    if len(counted) != max_unknown:
        return (
            f"{what}: parked unknown_outcome after {len(counted)} unknown outcomes in its history "
            f"(answers and lease expiries), not exactly max_unknown_attempts={max_unknown}: {seen}"
        )
    if len(storms) > max_unknown:
        return f"{what}: more calls than max_unknown_attempts={max_unknown}, so some went uncounted"
    executes = spec.kind == "storm_doomed_executed" and bool(storms)
    if runs != int(executes):
        return f"{what}: executed {runs} times, its storm executes {int(executes)}: {seen}"
    return None


def _counted_unknown(line: dict[str, Any]) -> bool:
    """A history line that counts toward max_unknown_attempts: an unknown outcome answered
    (kept for a retry, or the one that parked the row), or a lease expiry."""
    if line["code"] == "LEASE_EXPIRED":
        return True
    if line["decision"] not in ("retry", "park"):
        return False
    unknown = ("DEADLINE_EXCEEDED", "UNKNOWN", "INTERNAL", "ABORTED", "CANCELLED", "DATA_LOSS")
    if line["code"] == "UNAVAILABLE":  # but vgw-db: a rollover, retried without counting
        return "vgw-db" not in (_said(line["message"]) or "")
    return line["code"] in unknown


def _failed_to_connect_end(spec: RowSpec, row: dict[str, Any], runs: int, seen: str) -> str | None:
    """Executed, then "failed to connect" from the server: an unknown outcome. It commits on
    ALREADY_EXISTS (maybe_executed), or, expiring meanwhile, parks ``expired_unknown``."""
    state, reason, maybe = row["state"], row["park_reason"], bool(row["maybe_executed"])
    if spec.kind == "failed_to_connect_expires":
        fine = (state == "expired" and not runs) or (
            state == "parked" and reason == "expired_unknown" and maybe and runs <= 1
        )
        if fine:
            return None
        return (
            "executed, then answered UNAVAILABLE 'failed to connect …' by the server until it "
            f"expired: must end parked expired_unknown (maybe_executed), is {seen}"
        )
    if state != "committed" or runs != 1 or not maybe:
        return (
            "executed, then answered UNAVAILABLE 'failed to connect …' by the server, then "
            f"ALREADY_EXISTS: must be committed once with maybe_executed, is {seen}: "
            f"{row['last_message']}"
        )
    return None


def _reuse_end(spec: RowSpec, state: str, reason: str | None, seen: str) -> str | None:
    """A new row under a purged committed row's key: refused, or parked ``key_reused``."""
    if state == "committed":
        return (
            f"reuses the key of purged committed row {spec.reused_from} with another payload "
            f"and ended committed (Recrypt's ALREADY_EXISTS was for the old row: this payload "
            f"never executed); it must be refused at INSERT or parked {KEY_REUSED}: {seen}"
        )
    if state != "parked" or reason != KEY_REUSED:
        return (
            f"reuses the key of purged row {spec.reused_from}: must be parked {KEY_REUSED}: {seen}"
        )
    return None


def _edit_end(spec: RowSpec, state: str, reason: str | None, runs: int, seen: str) -> str | None:
    """A row whose method was edited after its first send: parked, never executed."""
    if spec.edited_after_send and (state != "parked" or reason not in EDITED_PARK_REASONS):
        return (
            f"method edited {spec.method} -> {spec.edited_to} after the first send: must be "
            f"parked ({' or '.join(sorted(EDITED_PARK_REASONS))}), is {seen}"
        )
    if state != "parked" or runs:
        return f"method-edit row must end parked unexecuted, is {seen}"
    return None


def _dropped_execution(name: str, row: dict[str, Any], runs: int, seen: str) -> list[str]:
    """An executed key never ends ``expired``, nor ``cancelled`` without ``--force``."""
    if not runs:
        return []
    if row["state"] == "expired":
        return [f"{name}: executed at Recrypt but ended expired (never executed, it says): {seen}"]
    if row["state"] == "cancelled" and not row.get("forced"):
        return [f"{name}: executed at Recrypt but cancelled without --force: {seen}"]
    return []


def _executed_then_errored(name: str, row: dict[str, Any], spans: list[Span]) -> list[str]:
    """A call that took effect and was answered an error leaves the row ``maybe_executed``."""
    if row["maybe_executed"] or row["state"] == "purged":
        return []
    errored = [s for s in spans if s.executed and s.code != "OK"]
    if not errored:
        return []
    first = errored[0]
    return [
        f"{name}: executed at Recrypt on a call answered {first.code} {first.message!r} at "
        f"{_clock(first.end)}, yet maybe_executed is false ({row['state']}): an error after the "
        "effect is an unknown outcome, never 'never sent'"
    ]


def _executed_as_written(
    name: str, spec: RowSpec, entry: LedgerEntry, catalog: Catalog
) -> list[str]:
    bad = []
    if entry.method != spec.method:
        bad.append(f"{name}: executed as {entry.method}")
    if entry.request != expected_request(spec, catalog):
        bad.append(f"{name}: executed with another payload: {entry.request}")
    if spec.not_before and entry.at < spec.not_before:
        bad.append(f"{name}: executed at {entry.at} before not_before {spec.not_before}")
    return bad


# --------------------------------------------------------------------------- lanes


def check_lanes(specs: list[RowSpec], observed: Observed) -> list[str]:
    """Lanes: id order among rows both visible; one row of a lane in flight at a time."""
    lanes: dict[str, list[RowSpec]] = defaultdict(list)
    for spec in specs:  # in id order
        if spec.lane and spec.refused is None:
            lanes[spec.lane].append(spec)
    bad: list[str] = []
    for lane, members in sorted(lanes.items()):
        bad += _lane_order(lane, members, observed)[:MAX_PER_LANE]
        bad += _lane_overlap(lane, members, observed)[:MAX_PER_LANE]
    return bad


def _lane_order(lane: str, members: list[RowSpec], observed: Observed) -> list[str]:
    """Y (later id) may execute before X only if X was not yet visible when Y was first sent.

    A row whose INSERT committed after a later row of its lane was already sent may go after
    it: no system can order by an id it cannot see yet.
    """
    ran = [s for s in members if s.key in observed.position]
    bad = []
    for i, x in enumerate(ran):
        for y in ran[i + 1 :]:
            if observed.position[y.key] > observed.position[x.key]:
                continue
            sent = observed.first_call.get(y.key)
            if x.visible_at is None or sent is None or x.visible_at < sent:
                bad.append(
                    f"lane {lane} executed out of order: row {y.index} {y.key} before row "
                    f"{x.index} {x.key} (earlier id, visible at {_clock(x.visible_at)}; "
                    f"{y.index} first sent at {_clock(sent)})"
                )
    return bad


def _lane_overlap(lane: str, members: list[RowSpec], observed: Observed) -> list[str]:
    """No two rows of a lane in flight at the simulator at once.

    A call counts until its answer, its caller's deadline (a call the daemon gave up on may
    sit on in the simulator, but the daemon rightly treats it as over), or its key's effect
    (once a key has executed, any call still carrying it can only answer ALREADY_EXISTS).
    """
    index = {s.key: s.index for s in members}
    spans = sorted((sp for s in members for sp in observed.by_key.get(s.key, [])), key=_start)
    bad = []
    for i, a in enumerate(spans):
        a_until = _live_until(a, observed)
        for b in spans[i + 1 :]:
            if b.start >= a_until:
                break
            if b.key != a.key:
                bad.append(
                    f"lane {lane}: rows {index[a.key]} and {index[b.key]} in flight at once at "
                    f"the simulator ({a.method.rsplit('/', 1)[-1]} {_clock(a.start)}-"
                    f"{_clock(a_until)} and {_clock(b.start)}-{_clock(_live_until(b, observed))})"
                )
    return bad


def _live_until(span: Span, observed: Observed) -> datetime:
    """Until when ``span`` could still take effect: see ``_lane_overlap``."""
    entry = observed.entries.get(span.key)
    if entry is None:
        return span.until
    return max(span.start, min(span.until, entry.at))


def _start(span: Span) -> datetime:
    return span.start


def _clock(at: datetime | None) -> str:
    return at.strftime("%H:%M:%S.%f")[:-3] if at else "?"


# --------------------------------------------------------------------------- calls


def check_calls(specs: list[RowSpec], observed: Observed) -> list[str]:
    """Each key is sent to one method, with one request, however many times it is sent."""
    names = {}
    for spec in specs:
        names.setdefault(spec.key, spec.index)
    bad = []
    for key, spans in observed.by_key.items():
        who = f"row {names.get(key, '?')} {key}"
        methods = sorted({s.method for s in spans})
        if len(methods) > 1:
            bad.append(f"{who}: one key sent to {len(methods)} methods: {', '.join(methods)}")
        requests = {json.dumps(s.request, sort_keys=True) for s in spans}
        if len(requests) > 1:
            bad.append(f"{who}: one key sent with {len(requests)} different requests")
    return bad


# --------------------------------------------------------------------------- responses


def check_responses(
    specs: list[RowSpec], table: Table, observed: Observed, catalog: Catalog
) -> list[str]:
    """A committed row whose executing call was answered OK to a daemon that lived on keeps
    that answer's response (e.g. PlaceOrder's order_id): it is the only copy the business has.
    """
    originals = {s.key: s for s in specs if s.reused_from is None}
    bad = []
    for span in observed.spans:
        spec = originals.get(span.key)
        if spec is None or not _delivered(span, observed.killed_at):
            continue
        row = table.row(spec)
        entry = observed.entries.get(span.key)
        if row is None or row["state"] != "committed" or entry is None:
            continue  # check_rows says what is wrong with it
        kept = _normal_response(catalog, span.method, row.get("response"))
        answered = _normal_response(catalog, span.method, entry.response)
        if kept != answered:
            bad.append(
                f"{label(spec)}: committed with response {row.get('response')} but Recrypt "
                f"answered {entry.response} (OK at {_clock(span.end)}, to a daemon that was not "
                "killed afterwards): the answer's response was lost"
            )
    return bad


def _delivered(span: Span, killed_at: dict[str, datetime]) -> bool:
    """The executing call's OK reached a daemon that could record it (not killed after)."""
    if not (span.executed and span.code == "OK" and span.answered):
        return False
    if span.end > span.start + timedelta(seconds=DEADLINE_S - 0.05):
        return False  # answered at the caller's deadline: it may not have been heard
    return span.caller is not None and span.caller not in killed_at


def _normal_response(catalog: Catalog, path: str, value: Any) -> Any:
    """A response as a dict with proto field names (stored rows use JSON names)."""
    if not isinstance(value, dict):
        return value
    message = catalog.methods[path].response_class()
    try:
        json_format.ParseDict(value, message, ignore_unknown_fields=True)
    except json_format.ParseError:
        return value
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# --------------------------------------------------------------------------- history


def check_history(specs: list[RowSpec], table: Table) -> list[str]:
    """Each answer the daemons recorded, read against the policy table (README), and no
    "key used before" commit: every key here is new, so only a row's own call can have
    used it, and then that call's outcome was recorded as never sent."""
    bad = []
    seen: set[str] = set()
    for spec in specs:
        if spec.key in seen:
            continue
        seen.add(spec.key)
        lines = table.history.get(spec.key, [])
        for line in lines:
            problem = _misread(line)
            if problem:
                bad.append(f"{label(spec)}: {problem}")
        used = [line for line in lines if line["decision"] == "commit_key_used_before"]
        if used and spec.reused_from is None:
            bad.append(
                f"{label(spec)}: committed as 'key used before' (ALREADY_EXISTS at its first "
                "attempt, not maybe_executed), but its key is new: only its own earlier call "
                "can have used it, and that call's outcome was recorded as never sent"
            )
    return bad


def _said(message: str | None) -> str | None:
    """What Recrypt said in a history line (None: no answer from Recrypt, e.g. never sent)."""
    marker = "; Recrypt said: "
    at = (message or "").find(marker)
    return None if at < 0 else (message or "")[at + len(marker) :]


#: The decisions the policy allows for an answer (code, what Recrypt said); None: unchecked.
def _allowed(code: str, said: str) -> frozenset[str] | None:
    unknown = frozenset({"retry", "park"})  # park: max_unknown_attempts reached
    if code == "PERMISSION_DENIED":
        return frozenset({"hand_back"})  # maintenance, or a method the key may not call
    if code == "RESOURCE_EXHAUSTED":
        number = re.fullmatch(r"\s*\d+\s*", said) is not None
        return frozenset({"park"}) if number else frozenset({"hand_back"})
    if code == "UNAVAILABLE":
        return frozenset({"retry"}) if "vgw-db" in said else unknown
    if code in ("DEADLINE_EXCEEDED", "UNKNOWN", "INTERNAL", "ABORTED", "CANCELLED", "DATA_LOSS"):
        return unknown
    return None


def _misread(line: dict[str, Any]) -> str | None:
    said = _said(line["message"])
    if said is None or line["decision"] == "late_answer":
        return None
    allowed = _allowed(str(line["code"]), said)
    if allowed is None or line["decision"] in allowed:
        return None
    return (
        f"Recrypt answered {line['code']} {said[:120]!r} and the daemon recorded "
        f"{line['decision']}; the policy says {' or '.join(sorted(allowed))}"
    )


# --------------------------------------------------------------------------- refused methods


def check_refusals(observed: Observed) -> list[str]:
    """A method refused outside maintenance is held: a daemon sends it again no sooner than
    ``HOLD_S`` after a refusal, unless it could not know to hold it (the refusal never reached
    it, its next MaintenanceCheck did not say "no maintenance", or its key was refused) or a
    SIGHUP released it. A daemon that resends at every probe (loops) is caught here."""
    bad = []
    for window in observed.windows:
        for caller, rounds in _refusal_rounds(window, observed.spans).items():
            for first, then in itertools.pairwise(rounds):
                gap = (then[0].start - first[-1].start).total_seconds()
                if gap >= 0.9 * HOLD_S or _released(caller, first, then, observed):
                    continue
                bad.append(
                    f"refused method {window.method} (PERMISSION_DENIED outside maintenance) "
                    f"sent again by daemon {_who(caller)} {gap:.2f}s after it was refused "
                    f"({_clock(first[-1].start)}, then {_clock(then[0].start)}), with no SIGHUP, "
                    "failed probe or outage in between: it must be held for [maintenance] "
                    f"unauthenticated_probe_interval ({HOLD_S:g}s)"
                )
    return bad


def _refusal_rounds(window: RefusalWindow, spans: list[Span]) -> dict[str | None, list[list[Span]]]:
    """The window's refusals by daemon, in batches (calls started within half a second)."""
    rounds: dict[str | None, list[list[Span]]] = defaultdict(list)
    refused = [s for s in spans if s.code == "PERMISSION_DENIED" and s.message == window.message]
    for span in sorted(refused, key=_start):
        batches = rounds[span.caller]
        if batches and (span.start - batches[-1][-1].start).total_seconds() < 0.5:
            batches[-1].append(span)
        else:
            batches.append([span])
    return rounds


def _released(caller: str | None, first: list[Span], then: list[Span], seen: Observed) -> bool:
    """Between two refusals: could the daemon not hold the method, or was it released?"""
    since, until = first[-1].start, then[0].start
    if not any(s.answered for s in first):
        return True  # the refusal never reached the daemon
    if any(since - SIGNAL < r.at < until and caller in r.callers for r in seen.reloads):
        return True  # (a SIGHUP sent just before the refusal may be taken in after it)
    if any(since < p.at < until and p.caller == caller and not p.clear for p in seen.probes):
        return True  # maintenance, or it could not tell: a method is never held on a guess
    if any(a < until and since < b for a, b in seen.sim_stops):
        return True  # its probe cannot have been answered
    return any(
        since < s.start < until and s.caller == caller and s.code == "UNAUTHENTICATED"
        for s in seen.spans
    )


def _who(caller: str | None) -> str:
    """A daemon as slot-generation (its API key's suffix), never the key itself."""
    return "-".join((caller or "?-?-?").rsplit("-", 2)[1:])
