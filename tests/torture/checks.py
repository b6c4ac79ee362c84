"""The promises, checked at the end of a run; each function returns one line per violation.

What they read: the table (``Table``: the rows, and those a retention run purged, as they
were just before), what happened at Recrypt (``Observed``: the simulator's ledger of effects
and its spans of calls, plus when the harness SIGKILLed each daemon) and the row specs.

- ``check_rows``: every row ends where its kind says (committed once, parked for the right
  reason, behind a parked row in its lane, expired unexecuted, refused at INSERT where that
  is allowed, cancelled unexecuted); nothing executed twice or with another payload; nothing
  that executed ends ``expired``, or ``cancelled`` without ``--force``.
- ``check_lanes``: in a lane, calls in id order among rows both visible; never two rows of a
  lane in flight at the simulator at once.
- ``check_calls``: each key reaches one method with one request, however often it is sent.
- ``check_responses``: a committed row whose OK answer reached its daemon keeps that response.
"""

from __future__ import annotations

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
    KEY_REUSED,
    MAX_UNKNOWN,
    RowSpec,
    Span,
)

MAX_PER_LANE = 3  # violation lines per lane and kind: the first few tell the story
MAX_ALIKE = 5  # violation lines of one shape (rows left open, say): then a count


class Simulated(Protocol):
    """What ``Observed.of`` reads from the simulator."""

    @property
    def ledger(self) -> list[LedgerEntry]: ...

    @property
    def spans(self) -> list[Span]: ...


@dataclass
class Observed:
    """What happened at Recrypt, and when the harness SIGKILLed which daemon (by API key)."""

    ledger: list[LedgerEntry]
    spans: list[Span] = field(default_factory=list)
    killed_at: dict[str, datetime] = field(default_factory=dict)

    @classmethod
    def of(cls, sim: Simulated, killed_at: dict[str, datetime]) -> Observed:
        return cls(sim.ledger, sim.spans, dict(killed_at))

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
    """The rows at the end, by key, and the rows retention purged (by key, oldest first)."""

    rows: dict[str, dict[str, Any]]
    purged: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

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


def check(specs: list[RowSpec], table: Table, observed: Observed, catalog: Catalog) -> list[str]:
    """Every promise; returns one line per violation."""
    ordered = in_id_order(specs, table)
    return (
        check_rows(ordered, table, observed, catalog)
        + check_lanes(ordered, observed)
        + check_calls(ordered, observed)
        + check_responses(ordered, table, observed, catalog)
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
    specs: list[RowSpec], table: Table, observed: Observed, catalog: Catalog
) -> list[str]:
    bad: list[str] = []
    blocked: set[str] = set()  # lanes with an (expected) parked row
    behind: Counter[str] = Counter()  # lane rows held behind an unexpectedly parked row
    stuck: set[str] = set()  # lanes with an unexpectedly parked row
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
        if spec.lane in stuck and state == "pending" and not runs:
            behind[spec.lane] += 1  # a consequence, reported once per lane below
            continue
        if spec.lane and spec.lane in blocked:
            if state != "pending" or runs:
                bad.append(f"{name}: behind a parked row, must stay pending unexecuted: {seen}")
            continue
        problem = _end_state(spec, row, runs, seen)
        if spec.park is not None and spec.lane:
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
    spec: RowSpec, row: dict[str, Any], runs: int, seen: str
) -> str | None:
    """What is wrong with where ``spec``'s row ended, or None."""
    state, reason, maybe = row["state"], row["park_reason"], bool(row["maybe_executed"])
    if spec.reused_from is not None:
        return _reuse_end(spec, state, reason, seen)
    if spec.kind == "method_edit":
        return _edit_end(spec, state, reason, runs, seen)
    if spec.cancelled:
        if state != "cancelled" or runs:
            return f"cancelled by an operator (no --force), must stay cancelled unexecuted: {seen}"
        return None
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
    if state == "parked" and reason == "unknown_outcome":
        unknown = row.get("unknown_attempts", row["attempts"])
        return (
            f"parked unknown_outcome after {row['attempts']} attempts of which only {unknown} "
            f"had an unknown outcome (limit {MAX_UNKNOWN}): rollover (vgw-db) retries count "
            f"toward max_unknown_attempts; {seen}"
        )
    if state != "committed" or runs != 1:
        return f"must be committed once, is {seen}: {row['last_message']}"
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
