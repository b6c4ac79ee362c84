"""The promises of the outbox, one function each, checked at the end of every torture run.

Each promise reads the ``Evidence`` (the row specs in id order, the table at the end, what
happened at Recrypt: ``observed``) and returns one line per violation. ``PROMISES`` lists
them in the order they are checked and reported; ``check`` runs them all and names the
promise at the start of each line (``no_row_lost: row 7 …``). Where each kind of row must
end is ``endings``.

Must not import the world (simulator, database, daemons) nor the chaos: it judges data.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from google.protobuf import json_format

from outbox.descriptors import Catalog, build_request
from outbox.simulator import LedgerEntry
from tests.torture.endings import clock as _clock
from tests.torture.endings import end_problem, said
from tests.torture.observed import (
    Evidence,
    Observed,
    RefusalWindow,
    Span,
    Table,
    in_id_order,
)
from tests.torture.vocabulary import (
    BAD_KINDS,
    DEADLINE_S,
    HOLD_S,
    MAX_UNKNOWN,
    OPEN,
    RowSpec,
)

MAX_PER_LANE = 3  # violation lines per lane and kind: the first few tell the story
MAX_ALIKE = 5  # violation lines of one shape (rows left open, say): then a count
SIGNAL = timedelta(seconds=0.5)  # a daemon acts on a signal within this

Promise = Callable[[Evidence], list[str]]


def label(spec: RowSpec) -> str:
    return f"row {spec.index} {spec.key!r} ({spec.kind}, {spec.via}, lane={spec.lane})"


def refusable(spec: RowSpec) -> bool:
    """Rows the database (or ``enqueue``) may refuse outright rather than park later."""
    return spec.kind in BAD_KINDS or spec.kind.startswith("poison_") or spec.kind == "key_reuse"


def expected_request(spec: RowSpec, catalog: Catalog) -> dict[str, Any]:
    method = catalog.submittable(spec.method)
    request = build_request(method, spec.payload, spec.key)
    result: dict[str, Any] = json_format.MessageToDict(request, preserving_proto_field_name=True)
    return result


# --------------------------------------------------------------------------- rows


def no_row_lost(e: Evidence) -> list[str]:
    """Nothing lost: every row the database accepted is in the table at the end (or was
    purged by retention once finished)."""
    return [
        f"{label(spec)}: lost (not in the table)"
        for spec in e.specs
        if spec.refused is None and e.table.row(spec) is None
    ]


def refused_only_when_allowed(e: Evidence) -> list[str]:
    """The database (or ``enqueue``) refuses an INSERT only for a row it may refuse: a bad
    row, a poison row, a key reused after retention."""
    return [
        f"{label(spec)}: the database refused its INSERT: {spec.refused}"
        for spec in e.specs
        if spec.refused is not None and not refusable(spec)
    ]


def no_key_executed_twice(e: Evidence) -> list[str]:
    """Nothing doubled: no row's key executed at Recrypt more than once."""
    return [
        f"{label(spec)}: executed {e.runs(spec)} times"
        for spec, _row in e.written()
        if e.runs(spec) > 1
    ]


def nothing_executed_unasked(e: Evidence) -> list[str]:
    """Nothing executed that no row asked for: every key Recrypt executed is a row's key."""
    strangers = set(e.observed.counts) - {s.key for s in e.specs}
    return [f"keys executed that no row has: {sorted(strangers)[:5]}"] if strangers else []


def nothing_executed_then_dropped(e: Evidence) -> list[str]:
    """Nothing executed then dropped: a key that executed never ends ``expired``, nor
    ``cancelled`` without ``--force``."""
    bad = []
    for spec, row in e.standing():
        if not e.runs(spec):
            continue
        if row["state"] == "expired":
            bad.append(
                f"{label(spec)}: executed at Recrypt but ended expired (never executed, it "
                f"says): {e.seen(spec, row)}"
            )
        elif row["state"] == "cancelled" and not row.get("forced"):
            bad.append(
                f"{label(spec)}: executed at Recrypt but cancelled without --force: "
                f"{e.seen(spec, row)}"
            )
    return bad


def errors_after_effect_marked_maybe_executed(e: Evidence) -> list[str]:
    """An error after the effect is an unknown outcome, never "never sent": a call that took
    effect and was answered an error leaves its row ``maybe_executed``."""
    bad = []
    for spec, row in e.standing():
        spans = e.observed.by_key.get(spec.key, [])
        errored = [s for s in spans if s.executed and s.code != "OK"]
        if spec.reused_from is not None or row["maybe_executed"] or not errored:
            continue
        first = errored[0]
        bad.append(
            f"{label(spec)}: executed at Recrypt on a call answered {first.code} "
            f"{first.message!r} at {_clock(first.end)}, yet maybe_executed is false "
            f"({row['state']}): an error after the effect is an unknown outcome, never "
            "'never sent'"
        )
    return bad


def lanes_move_on_after_a_finished_head(e: Evidence) -> list[str]:
    """A lane whose parked head an operator finished (cancelled, requeued, or cancelled by
    hand and released by the LaneKeeper) moves on: none of its rows is left pending with no
    open row before it ("waits behind a finished row")."""
    waiting = _waiting_behind_finished(e)
    return [
        f"{label(spec)}: {waiting[spec.key]}: {e.seen(spec, row)}"
        for spec, row in e.standing()
        if spec.key in waiting
    ]


def every_row_ends_where_its_kind_says(e: Evidence) -> list[str]:
    """Every row ends where its kind says (``endings``): committed once, parked for the reason
    its fault calls for, expired unexecuted, cancelled unexecuted; the rows behind a parked
    lane head stay pending unexecuted, and a lane held by a row parked for no reason is named
    once."""
    waiting = _waiting_behind_finished(e)
    walk = _LaneWalk()
    bad = []
    for spec, row in e.standing():
        if spec.key not in waiting:
            bad += walk.judge(e, spec, row)
    return bad + walk.held()


def executed_as_written(e: Evidence) -> list[str]:
    """What executed is what was written: the row's method, its payload, and not before its
    ``not_before``."""
    bad = []
    for spec, _row in e.standing():
        entry = e.observed.entries.get(spec.key)
        if e.runs(spec) and entry is not None and isinstance(spec.payload, dict):
            bad += _executed_as_written(label(spec), spec, entry, e.catalog)
    return bad


def bad_rows_never_sent(e: Evidence) -> list[str]:
    """A bad or poison row is never sent to Recrypt (it parks ``bad_row`` or is refused)."""
    sent = set(e.observed.by_key) | {entry.key for entry in e.observed.ledger}
    return [
        f"bad row {spec.index} {spec.key!r} ({spec.kind}) was sent"
        for spec in e.specs
        if (spec.kind in BAD_KINDS or spec.kind.startswith("poison_"))
        and {spec.key, spec.key.lower()} & sent
    ]


def every_row_can_be_shown(e: Evidence) -> list[str]:
    """An operator can always look at a row: ``outbox show`` (and the console) read every row,
    whatever bytes its writer stored."""
    return [f"row {key!r} cannot be shown: {error}" for key, error in e.table.unshowable.items()]


# --------------------------------------------------------------------------- lanes


def lanes_in_order(e: Evidence) -> list[str]:
    """Lanes in order: a lane's rows execute in id order, among rows both visible."""
    bad: list[str] = []
    for lane, members in _lanes(e):
        bad += _lane_order(lane, members, e.observed)[:MAX_PER_LANE]
    return bad


def one_row_of_a_lane_in_flight(e: Evidence) -> list[str]:
    """Never two rows of a lane in flight at Recrypt at once."""
    bad: list[str] = []
    for lane, members in _lanes(e):
        bad += _lane_overlap(lane, members, e.observed)[:MAX_PER_LANE]
    return bad


# --------------------------------------------------------------------------- calls


def one_method_per_key(e: Evidence) -> list[str]:
    """A key reaches one method, however often it is sent (a method edit never re-aims it)."""
    bad = []
    for who, spans in _calls_by_key(e):
        methods = sorted({s.method for s in spans})
        if len(methods) > 1:
            bad.append(f"{who}: one key sent to {len(methods)} methods: {', '.join(methods)}")
    return bad


def one_request_per_key(e: Evidence) -> list[str]:
    """A key is sent with one request, however often it is sent."""
    bad = []
    for who, spans in _calls_by_key(e):
        requests = {json.dumps(s.request, sort_keys=True) for s in spans}
        if len(requests) > 1:
            bad.append(f"{who}: one key sent with {len(requests)} different requests")
    return bad


def every_response_kept(e: Evidence) -> list[str]:
    """Every response recorded: a committed row whose executing call was answered OK to a
    daemon that lived on keeps that answer's response (e.g. PlaceOrder's order_id): it is the
    only copy the business has."""
    originals = {s.key: s for s in e.specs if s.reused_from is None}
    bad = []
    for span in e.observed.spans:
        spec = originals.get(span.key)
        if spec is None or not _delivered(span, e.observed.killed_at):
            continue
        row = e.table.row(spec)
        entry = e.observed.entries.get(span.key)
        if row is None or row["state"] != "committed" or entry is None:
            continue  # another promise says what is wrong with it
        if _normal_response(e.catalog, span.method, row.get("response")) != _normal_response(
            e.catalog, span.method, entry.response
        ):
            bad.append(
                f"{label(spec)}: committed with response {row.get('response')} but Recrypt "
                f"answered {entry.response} (OK at {_clock(span.end)}, to a daemon that was not "
                "killed afterwards): the answer's response was lost"
            )
    return bad


# --------------------------------------------------------------------------- history


def every_answer_read_as_the_policy_says(e: Evidence) -> list[str]:
    """Every answer the daemons recorded is read as the policy table says (README):
    PERMISSION_DENIED and rate limiting, digits or not, handed back uncounted; a bare number
    parks ``object_limit``; a server's "failed to connect" and DEADLINE_EXCEEDED vgw-db are
    unknown outcomes."""
    bad = []
    for spec in _unique_keys(e.specs):
        for line in e.table.history.get(spec.key, []):
            problem = _misread(line)
            if problem:
                bad.append(f"{label(spec)}: {problem}")
    return bad


def no_new_key_committed_as_used_before(e: Evidence) -> list[str]:
    """No row commits as "key used before": every key here is new, so only a row's own call
    can have used it, and then that call's outcome was recorded as never sent."""
    bad = []
    for spec in _unique_keys(e.specs):
        lines = e.table.history.get(spec.key, [])
        used = [line for line in lines if line["decision"] == "commit_key_used_before"]
        if used and spec.reused_from is None:
            bad.append(
                f"{label(spec)}: committed as 'key used before' (ALREADY_EXISTS at its first "
                "attempt, not maybe_executed), but its key is new: only its own earlier call "
                "can have used it, and that call's outcome was recorded as never sent"
            )
    return bad


# --------------------------------------------------------------------------- refused methods


def refused_methods_held(e: Evidence) -> list[str]:
    """A method refused outside maintenance is held: a daemon sends it again no sooner than
    ``HOLD_S`` after a refusal, unless it could not know to hold it (the refusal never reached
    it, its next MaintenanceCheck did not say "no maintenance", or its key was refused) or a
    SIGHUP released it. A daemon that resends at every probe (loops) is caught here."""
    bad = []
    for window in e.observed.windows:
        for caller, rounds in _refusal_rounds(window, e.observed.spans).items():
            for first, then in itertools.pairwise(rounds):
                gap = (then[0].start - first[-1].start).total_seconds()
                if gap >= 0.9 * HOLD_S or _released(caller, first, then, e.observed):
                    continue
                bad.append(
                    f"refused method {window.method} (PERMISSION_DENIED outside maintenance) "
                    f"sent again by daemon {_who(caller)} {gap:.2f}s after it was refused "
                    f"({_clock(first[-1].start)}, then {_clock(then[0].start)}), with no SIGHUP, "
                    "failed probe or outage in between: it must be held for [maintenance] "
                    f"unauthenticated_probe_interval ({HOLD_S:g}s)"
                )
    return bad


#: Every promise, in the order the checker runs them and the report names them.
PROMISES: tuple[Promise, ...] = (
    no_row_lost,
    refused_only_when_allowed,
    no_key_executed_twice,
    nothing_executed_unasked,
    nothing_executed_then_dropped,
    errors_after_effect_marked_maybe_executed,
    lanes_move_on_after_a_finished_head,
    every_row_ends_where_its_kind_says,
    executed_as_written,
    bad_rows_never_sent,
    every_row_can_be_shown,
    lanes_in_order,
    one_row_of_a_lane_in_flight,
    one_method_per_key,
    one_request_per_key,
    every_response_kept,
    every_answer_read_as_the_policy_says,
    no_new_key_committed_as_used_before,
    refused_methods_held,
)


def promise_names() -> list[str]:
    return [promise.__name__ for promise in PROMISES]


def check(
    specs: list[RowSpec],
    table: Table,
    observed: Observed,
    catalog: Catalog,
    max_unknown: int = MAX_UNKNOWN,
) -> list[str]:
    """Every promise; one line per violation, each starting with the promise's name.
    ``max_unknown``: the daemons' ``[retry] max_unknown_attempts``."""
    evidence = Evidence(in_id_order(specs, table), table, observed, catalog, max_unknown)
    return [f"{promise.__name__}: {line}" for promise in PROMISES for line in promise(evidence)]


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


# --------------------------------------------------------------------------- helpers: rows


class _LaneWalk:
    """``every_row_ends_where_its_kind_says`` walks the rows in id order, lane by lane: rows
    behind an expected parked row (a doomed lane head) must stay pending unexecuted; rows
    behind an unexpectedly parked row are a consequence of it, counted once per lane."""

    def __init__(self) -> None:
        self.blocked: set[str] = set()  # lanes with an (expected) parked row
        self.stuck: set[str] = set()  # lanes with an unexpectedly parked row
        self.behind: Counter[str] = Counter()  # lane rows held behind an unexpectedly parked row

    def judge(self, e: Evidence, spec: RowSpec, row: dict[str, Any]) -> list[str]:
        runs, seen, state = e.runs(spec), e.seen(spec, row), row["state"]
        if spec.lane in self.stuck and state == "pending" and not runs:
            self.behind[spec.lane or ""] += 1  # a consequence, reported once per lane
            return []
        if spec.lane and spec.lane in self.blocked:
            if state != "pending" or runs:
                return [f"{label(spec)}: behind a parked row, must stay pending unexecuted: {seen}"]
            return []
        spans, lines = e.observed.by_key.get(spec.key, []), e.table.history.get(spec.key, [])
        problem = end_problem(spec, row, runs, seen, spans, lines, e.max_unknown)
        if spec.park is not None and spec.lane and spec.unblocked is None:
            self.blocked.add(spec.lane)
        elif problem and state == "parked" and spec.lane:
            self.stuck.add(spec.lane)
        return [f"{label(spec)}: {problem}"] if problem else []

    def held(self) -> list[str]:
        return [
            f"lane {lane}: {n} rows held pending behind its unexpectedly parked row"
            for lane, n in sorted(self.behind.items())
        ]


def _waiting_behind_finished(e: Evidence) -> dict[str, str]:
    """Rows (by key) of a lane whose parked head an operator finished that are still pending
    with no open row before them in their lane: nothing holds them back any more.

    The head itself is judged by ``endings`` (an operator's end).
    """
    heads = {s.lane: s for s in e.specs if s.lane and s.unblocked}
    open_lanes: set[str] = set()  # lanes with an open row so far
    found = {}
    for spec in e.specs:
        row = e.table.row(spec) if spec.refused is None else None
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


# --------------------------------------------------------------------------- helpers: lanes


def _lanes(e: Evidence) -> list[tuple[str, list[RowSpec]]]:
    """The lanes, each with its rows the database accepted, in id order."""
    lanes: dict[str, list[RowSpec]] = defaultdict(list)
    for spec in e.specs:  # in id order
        if spec.lane and spec.refused is None:
            lanes[spec.lane].append(spec)
    return sorted(lanes.items())


def _lane_order(lane: str, members: list[RowSpec], observed: Observed) -> list[str]:
    """Y (later id) may execute before X only if X was not yet visible when Y was first sent.

    A row whose INSERT committed after a later row of its lane was already sent may go after
    it: no system can order by an id it cannot see yet. "Sent" is the call's arrival at the
    simulator, later than the claim that decided it; so a row the harness saw already claimed
    when X's commit returned (``raced_with``) may go first too.
    """
    ran = [s for s in members if s.key in observed.position]
    bad = []
    for i, x in enumerate(ran):
        for y in ran[i + 1 :]:
            if observed.position[y.key] > observed.position[x.key] or x.raced_with == y.key:
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


# --------------------------------------------------------------------------- helpers: calls


def _calls_by_key(e: Evidence) -> Iterator[tuple[str, list[Span]]]:
    """Each key's calls at Recrypt, with the row it belongs to named."""
    names: dict[str, int] = {}
    for spec in e.specs:
        names.setdefault(spec.key, spec.index)
    for key, spans in e.observed.by_key.items():
        yield f"row {names.get(key, '?')} {key}", spans


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


# --------------------------------------------------------------------------- helpers: history


def _unique_keys(specs: list[RowSpec]) -> list[RowSpec]:
    """The first spec of each key (a reused key's history is its first row's)."""
    seen: set[str] = set()
    first = []
    for spec in specs:
        if spec.key not in seen:
            seen.add(spec.key)
            first.append(spec)
    return first


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
    text = said(line["message"])
    if text is None or line["decision"] == "late_answer":
        return None
    allowed = _allowed(str(line["code"]), text)
    if allowed is None or line["decision"] in allowed:
        return None
    return (
        f"Recrypt answered {line['code']} {text[:120]!r} and the daemon recorded "
        f"{line['decision']}; the policy says {' or '.join(sorted(allowed))}"
    )


# --------------------------------------------------------------------------- helpers: refusals


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
