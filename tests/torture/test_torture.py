"""The CI-sized torture run on SQLite, PostgreSQL and MariaDB (see ``harness``), and the
promises (``promises``) shown to catch each violation, one test id per promise and case.

The seed is printed with the figures; ``OUTBOX_TORTURE_SEED`` replays one. The long run is
``python -m tests.torture --minutes 10 --db postgresql --restart-postgres --seed N``.
"""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache

import pytest

from outbox.descriptors import Catalog
from outbox.simulator import CANCEL_ORDER, PLACE_ORDER, TRANSFER, LedgerEntry
from tests.torture.answers import refused_since_reload
from tests.torture.database import Database
from tests.torture.faults import (
    FAILED_TO_CONNECT,
    VGW_DB_DEADLINE,
    ChaosFault,
    UnknownBudget,
    counts_unknown,
)
from tests.torture.harness import run_torture
from tests.torture.observed import Observed, Probe, RefusalWindow, Reload, Span, Table
from tests.torture.promises import check, expected_request, promise_names
from tests.torture.seams import poison_kinds
from tests.torture.vocabulary import API_KEY, C, RowSpec

SEED = int(os.environ.get("OUTBOX_TORTURE_SEED") or random.SystemRandom().randrange(10**6))
DURATION_S = float(os.environ.get("OUTBOX_TORTURE_SECONDS", "20"))
#: [retry] for the CI-sized run: a storm-doomed row ends parked after MAX_UNKNOWN unknown
#: outcomes a backoff (at most MAX_BACKOFF_S) apart, well inside the run. Rows no storm doomed
#: collect a few at most (the figure ``max_unknown_others``).
MAX_UNKNOWN = 12
MAX_BACKOFF_S = 1.0
#: The seams of issue 9: each must have been injected in every CI-sized run.
SEAMS = ("db_outage", "method_edit", "key_reuse", "reload_in_flight", "operator_cancel")
#: The lane-head seams of issue 11 (``lanes``): each in every CI-sized run.
LANE_HEADS = ("lane_unblock", "head_by_hand")
#: A refused-method window opens only while every daemon's gate is open; in a 30 s run on a
#: loaded machine other faults can keep a gate closed throughout (seen once in CI, MariaDB,
#: seed 835700, violations=0): its coverage is the long run's, not every short run's.
WINDOWED = frozenset({"refused_method_window"})
#: The answers of issue 10 (``answers`` and ``faults.GENERAL``): each in every CI-sized run.
ANSWERS = (
    "refused_method_window",
    "server_failed_to_connect",
    "rate_limited_429",
    "rate_limited_retry_in",
    "vgw_db_storm",
    "storm_doomed",
    "storm_doomed_executed",
)


@pytest.mark.timeout(300)
def test_torture_keeps_the_promise(db_url, tmp_path) -> None:
    report = run_torture(
        db_url,
        SEED,
        DURATION_S,
        workdir=tmp_path,
        settle_s=90.0,
        max_unknown=MAX_UNKNOWN,
        max_backoff=MAX_BACKOFF_S,
    )
    print(report.promises_line())
    print(report.line())
    assert report.violations == [], (
        f"{report.line()}\nreplay: OUTBOX_TORTURE_SEED={SEED} (logs in {tmp_path})\n"
        + "\n".join(report.violations[:30])
    )
    # The run really was a torture: each kind of chaos happened and faults met real calls.
    assert report.kills and report.conn_cuts and report.sim_restarts, report.line()
    assert report.extra["fault_hits"] >= 10, report.line()
    assert report.extra["executed_errored"] >= 1, report.line()  # executed, then errored
    for seam in (*SEAMS, *LANE_HEADS):
        assert report.faults[seam] >= 1, (seam, report.line())
    for kind in ANSWERS:
        if kind in WINDOWED:
            continue
        assert report.faults[kind] >= 1, (kind, report.line())
    failed_to_connect = ("failed_to_connect", "failed_to_connect_expires")
    assert sum(report.faults[k] for k in failed_to_connect) >= 1, report.line()
    if report.faults["refused_method_window"]:
        assert report.extra["refused_held_seen"] >= 1, report.line()  # the window held it
    for kind in poison_kinds(report.db):
        assert any(k.startswith(f"poison_{kind}") for k in report.faults), (kind, report.line())
    if report.db != "sqlite":  # SQLite serialises writers: no lane race is possible there
        assert report.faults["lane_race"] >= 1, report.line()


# --------------------------------------------------------------------------- the checks


NOW = datetime.now(UTC)
BODY = {"fromAccount": "a", "toAccount": "b", "amount": "1.00"}
K = [str(uuid.UUID(int=i + 1, version=4)) for i in range(12)]  # keys the cases can name


def _entry(
    catalog: Catalog, key: str, payload: dict[str, str], at: float = 0.0, **response: str
) -> LedgerEntry:
    request = expected_request(RowSpec(0, key, TRANSFER, payload, "plain", "sql"), catalog)
    return LedgerEntry(key, TRANSFER, request, NOW + timedelta(seconds=at), response)


def _row(row_id: int, state: str, reason: str | None = None, **more: object) -> dict[str, object]:
    return {
        "id": row_id,
        "state": state,
        "park_reason": reason,
        "maybe_executed": False,
        "last_code": None,
        "last_message": None,
        "response": None,
        "forced": False,
    } | more


def _span(key: str, start: float, end: float, method: str = TRANSFER, **more: object) -> Span:
    fields: dict[str, object] = {
        "code": "OK",
        "executed": False,
        "answered": True,
        "caller": API_KEY,
        "request": {"idempotency_key": key},
    } | more
    at = NOW + timedelta(seconds=start)
    return Span(key, method, at, NOW + timedelta(seconds=end), **fields)  # type: ignore[arg-type]


def _line(code: str, decision: str, said: str) -> dict[str, object]:
    return {"code": code, "decision": decision, "message": f"explanation; Recrypt said: {said}"}


def _storm_history(count: int) -> list[dict[str, object]]:
    retries = [_line("DEADLINE_EXCEEDED", "retry", VGW_DB_DEADLINE)] * (count - 1)
    return [*retries, _line("DEADLINE_EXCEEDED", "park", VGW_DB_DEADLINE)]


@dataclass
class Scene:
    """What a run might have left: its rows as written, the table, what Recrypt saw."""

    specs: list[RowSpec]
    table: Table
    observed: Observed = field(default_factory=lambda: Observed([]))
    max_unknown: int = 50


def _broken_promises(catalog: Catalog) -> Scene:
    """Rows each breaking one of the plain promises."""
    specs = [
        RowSpec(0, K[0], TRANSFER, BODY, "lane", "sql", lane="L"),
        RowSpec(1, K[1], TRANSFER, BODY, "lane", "api", lane="L"),
        RowSpec(2, K[2], TRANSFER, BODY, "doom:precondition", "api", park="precondition"),
        RowSpec(3, K[3], TRANSFER, BODY, "plain", "sql"),
        RowSpec(4, K[4], TRANSFER, BODY, "plain", "sql"),
        RowSpec(5, K[5], TRANSFER, BODY, "plain", "sql"),
        RowSpec(6, K[6], TRANSFER, BODY, "plain", "sql", refused="CHECK constraint failed"),
        RowSpec(7, K[7], TRANSFER, BODY, "plain", "api"),
        RowSpec(8, K[8], "/nope", BODY, "bad_method", "sql", park="bad_row"),
    ]
    rows = {
        K[0]: _row(1, "committed"),
        K[1]: _row(2, "committed"),
        K[2]: _row(3, "committed"),  # should have parked
        K[3]: _row(4, "committed"),  # committed without an effect
        K[4]: _row(5, "committed"),  # executed with another payload
        K[7]: _row(8, "committed"),  # executed twice
        K[8]: _row(9, "parked", "bad_row"),  # but it was sent
    }  # K[5]: lost; K[6]: refused, though a plain row
    ledger = [
        _entry(catalog, K[1], BODY),  # lane out of order
        _entry(catalog, K[0], BODY),
        _entry(catalog, K[2], BODY),
        _entry(catalog, K[4], {**BODY, "amount": "2.00"}),
        _entry(catalog, K[7], BODY),
        _entry(catalog, K[7], BODY, at=1.0),
        _entry(catalog, K[11], BODY),  # no row has this key
    ]
    unshowable = {K[8]: "OperationalError: Could not decode to UTF-8 column 'first_payload'"}
    table = Table(rows, unshowable=unshowable)
    return Scene(specs, table, Observed(ledger, [_span(K[8], 0.0, 0.1, "/nope")]))


def _broken_seams(catalog: Catalog) -> Scene:
    """The seams of issue 9, each broken."""
    late = RowSpec(0, K[0], TRANSFER, BODY, "lane", "sql", lane="R", visible_at=NOW)
    early = RowSpec(1, K[1], TRANSFER, BODY, "lane", "sql", lane="R", visible_at=NOW)
    edited = RowSpec(2, K[2], PLACE_ORDER, {"account": "t"}, "method_edit", "sql")
    edited.edited_to, edited.edited_after_send = CANCEL_ORDER, True
    reused = RowSpec(3, K[3], TRANSFER, {**BODY, "amount": "3.00"}, "key_reuse", "sql")
    reused.reused_from = 4
    original = RowSpec(4, K[3], TRANSFER, BODY, "plain", "sql")
    expired = RowSpec(5, K[5], TRANSFER, BODY, "expires", "api")
    poison = RowSpec(6, K[6], TRANSFER, "{}", "poison_surrogate", "sql", park="bad_row")
    answered = RowSpec(7, K[7], TRANSFER, BODY, "plain", "api")
    cancelled = RowSpec(8, K[8], TRANSFER, BODY, "plain", "api", cancelled=True)
    specs = [late, early, edited, reused, original, expired, poison, answered, cancelled]
    rows = {
        K[0]: _row(1, "committed"),
        K[1]: _row(2, "committed"),
        K[2]: _row(3, "parked", "precondition"),  # sent to the edited method instead
        K[3]: _row(9, "committed"),  # the reused key committed on ALREADY_EXISTS
        K[5]: _row(5, "expired"),  # but it executed
        K[6]: _row(6, "pending"),  # the poison row never parked
        K[7]: _row(7, "committed"),  # without the response it was answered
        K[8]: _row(8, "cancelled"),  # but it executed
    }
    purged = {K[3]: [_row(4, "committed")]}
    return Scene(specs, Table(rows, purged), _broken_seams_observed(catalog))


def _broken_seams_observed(catalog: Catalog) -> Observed:
    ledger = [
        _entry(catalog, K[0], BODY, at=0.3),
        _entry(catalog, K[1], BODY, at=0.6),
        _entry(catalog, K[3], BODY),
        _entry(catalog, K[5], BODY),
        _entry(catalog, K[7], BODY, transfer_id="t-7"),
        _entry(catalog, K[8], BODY),
    ]
    spans = [
        _span(K[1], 0.0, 0.6),  # the later row held...
        _span(K[0], 0.2, 0.3),  # ...while the earlier one (committed late) was sent
        _span(K[2], 1.0, 1.1, PLACE_ORDER, code="DEADLINE_EXCEEDED"),
        _span(K[2], 2.0, 2.1, CANCEL_ORDER, code="FAILED_PRECONDITION", request={}),
        _span(K[7], 3.0, 3.1, executed=True),
    ]
    return Observed(ledger, spans)


def _wrong_answers(catalog: Catalog) -> Scene:
    """What the daemon did before issue 10, row by row, and the right behaviour next to it
    (rows 5, 6 and 8)."""
    storm = "storm_doomed_executed"
    specs = [
        RowSpec(0, K[0], TRANSFER, BODY, "plain", "sql"),  # got "429 Too Many Requests"
        RowSpec(1, K[1], TRANSFER, BODY, "failed_to_connect", "api"),
        RowSpec(2, K[2], TRANSFER, BODY, "failed_to_connect_expires", "api"),
        RowSpec(3, K[3], TRANSFER, BODY, storm, "sql", park="unknown_outcome"),
        RowSpec(4, K[4], TRANSFER, BODY, "storm_doomed", "sql", park="unknown_outcome"),
        RowSpec(5, K[5], TRANSFER, BODY, storm, "api", park="unknown_outcome"),  # right
        RowSpec(6, K[6], TRANSFER, BODY, "failed_to_connect", "sql"),  # right
        RowSpec(7, K[7], PLACE_ORDER, {"account": "t"}, "refused_method", "api"),
        RowSpec(8, K[8], TRANSFER, BODY, "plain", "api"),  # got "rate limit ..., retry in 1s"
    ]
    maybe = {"maybe_executed": True}
    rows = {
        K[0]: _row(1, "parked", "object_limit", last_code="RESOURCE_EXHAUSTED"),
        K[1]: _row(2, "committed"),  # handed back as never sent, then "key used before"
        K[2]: _row(3, "expired"),  # handed back as never sent, then expired
        K[3]: _row(4, "pending", **maybe),  # vgw-db deadlines not counted: never parks
        K[4]: _row(5, "parked", "unknown_outcome", **maybe),  # parked one too early
        K[5]: _row(6, "parked", "unknown_outcome", **maybe),
        K[6]: _row(7, "committed", **maybe),
        K[7]: _row(8, "committed"),
        K[8]: _row(9, "committed"),
    }
    table = Table(rows, {}, _wrong_answers_history())
    return Scene(specs, table, _wrong_answers_observed(catalog), max_unknown=12)


def _wrong_answers_history() -> dict[str, list[dict[str, object]]]:
    return {
        K[0]: [_line("RESOURCE_EXHAUSTED", "park", "429 Too Many Requests")],
        K[1]: [
            _line("UNAVAILABLE", "hand_back", FAILED_TO_CONNECT),
            _line("ALREADY_EXISTS", "commit_key_used_before", "already used"),
        ],
        K[3]: [
            *[_line("DEADLINE_EXCEEDED", "retry", VGW_DB_DEADLINE)] * 20,
            _line("DEADLINE_EXCEEDED", "hand_back", VGW_DB_DEADLINE),  # as if a rollover
        ],
        K[4]: _storm_history(11),
        K[5]: _storm_history(12),
        K[6]: [
            _line("UNAVAILABLE", "retry", FAILED_TO_CONNECT),
            _line("ALREADY_EXISTS", "commit", "already used"),
        ],
        K[7]: [_line("PERMISSION_DENIED", "retry", "may not call PlaceOrder")],
        K[8]: [
            _line("RESOURCE_EXHAUSTED", "hand_back", "rate limit exceeded, retry in 1s"),
            _line("OK", "commit", ""),
        ],
    }


def _wrong_answers_observed(catalog: Catalog) -> Observed:
    ftc = {"code": "UNAVAILABLE", "message": FAILED_TO_CONNECT, "executed": True}
    storms = (
        _span(key, 0.0, 0.1, code="DEADLINE_EXCEEDED", message=VGW_DB_DEADLINE)
        for key in (K[3], K[4], K[5])
    )
    return Observed(
        [_entry(catalog, key, BODY) for key in (K[1], K[2], K[5], K[6], K[8])],
        [
            _span(K[0], 0.0, 0.1, code="RESOURCE_EXHAUSTED", message="429 Too Many Requests"),
            _span(K[1], 0.0, 0.1, **ftc),
            _span(K[2], 0.0, 0.1, **ftc),
            _span(K[6], 0.0, 0.1, **ftc),
            *storms,
        ],
    )


def _finished_heads(catalog: Catalog) -> Scene:
    """Lanes whose parked head an operator finished (``lanes``): each must move on. A row of
    it still pending at the end waits behind a finished row; a lane whose head is still
    parked holds its rows, as before."""
    lanes = ["U", "U", "U", "V", "V", "H", "H", "P", "P"]
    specs = [
        RowSpec(i, K[i], TRANSFER, BODY, "behind_head", "sql", lane=lane, visible_at=NOW)
        for i, lane in enumerate(lanes)
    ]
    for i, how in ((0, "cancel"), (3, "requeue"), (5, "sql"), (7, None)):
        specs[i].kind, specs[i].park, specs[i].unblocked = "lane_head", "precondition", how
    rows = {
        K[0]: _row(1, "cancelled"),
        K[1]: _row(2, "committed"),
        K[2]: _row(3, "pending"),  # waits behind the cancelled head
        K[3]: _row(4, "committed"),  # requeued with the fault cleared: committed
        K[4]: _row(5, "committed"),
        K[5]: _row(6, "cancelled"),  # by hand
        K[6]: _row(7, "pending"),  # no LaneKeeper released it
        K[7]: _row(8, "parked", "precondition"),
        K[8]: _row(9, "pending"),  # behind a parked head: fine
    }
    return Scene(
        specs, Table(rows), Observed([_entry(catalog, K[i], BODY, at=i) for i in (1, 3, 4)])
    )


def _refusals(_catalog: Catalog) -> Scene:
    """Held for HOLD_S after a refusal unless something let it go: a daemon that resends the
    method as soon as its MaintenanceCheck says "no maintenance" (it looped) is caught."""
    window = RefusalWindow(PLACE_ORDER, "may not call PlaceOrder", NOW, NOW + timedelta(9))
    looped, held, reloaded, unsure = (f"{API_KEY}-{i}-1" for i in range(4))

    def refused(caller: str, at: float) -> Span:
        return _span(
            str(uuid.uuid4()), at, at + 0.01, PLACE_ORDER, code="PERMISSION_DENIED",
            message=window.message, caller=caller,
        )  # fmt: skip

    def probe(caller: str, at: float, code: str = "OK") -> Probe:
        return Probe(caller, NOW + timedelta(seconds=at), code, maintenance=False)

    spans = [
        *(refused(looped, at) for at in (0.0, 0.01, 1.1, 2.2)),  # one batch, then a loop
        *(refused(held, at) for at in (0.0, 3.0, 6.1)),
        *(refused(reloaded, at) for at in (0.0, 1.0)),
        *(refused(unsure, at) for at in (0.0, 1.0)),
    ]
    probes = [probe(looped, 0.9), probe(looped, 2.0), probe(held, 0.9)]
    probes.append(probe(unsure, 0.9, "UNAVAILABLE"))
    reloads = [Reload(NOW + timedelta(seconds=0.5), frozenset({reloaded}))]
    observed = Observed([], spans, probes=probes, reloads=reloads, windows=[window])
    return Scene([], Table({}), observed)


SCENES = {
    "promises": _broken_promises,
    "seams": _broken_seams,
    "answers": _wrong_answers,
    "finished_heads": _finished_heads,
    "refusals": _refusals,
}


@cache
def _found(scene: str) -> tuple[str, ...]:
    """Every violation line the checks find in a scene."""
    catalog = Catalog.load()
    s = SCENES[scene](catalog)
    return tuple(check(s.specs, s.table, s.observed, catalog, s.max_unknown))


def _said_by(scene: str, promise: str) -> list[str]:
    """The lines of one promise, without its name."""
    prefix = f"{promise}: "
    return [line.removeprefix(prefix) for line in _found(scene) if line.startswith(prefix)]


def _caught(scene: str, promise: str, expected: str) -> None:
    lines = _said_by(scene, promise)
    assert any(expected in line for line in lines), (promise, expected, _found(scene))


#: (case, scene, the promise broken there, what it must say): one test id each.
PROMISE_CASES = [
    (
        "row_not_shown",
        "promises",
        "every_row_can_be_shown",
        f"row {K[8]!r} cannot be shown: OperationalError",
    ),
    ("lost", "promises", "no_row_lost", f"row 5 {K[5]!r} (plain, sql, lane=None): lost"),
    (
        "refused_plain_row",
        "promises",
        "refused_only_when_allowed",
        "the database refused its INSERT: CHECK",
    ),
    (
        "executed_twice",
        "promises",
        "no_key_executed_twice",
        f"row 7 {K[7]!r} (plain, api, lane=None): executed 2",
    ),
    (
        "stranger_key",
        "promises",
        "nothing_executed_unasked",
        f"keys executed that no row has: [{K[11]!r}]",
    ),
    (
        "doomed_row_committed",
        "promises",
        "every_row_ends_where_its_kind_says",
        "must be parked precondition",
    ),
    (
        "committed_without_effect",
        "promises",
        "every_row_ends_where_its_kind_says",
        f"{K[3]!r} (plain, sql, lane=None): must",
    ),
    ("another_payload", "promises", "executed_as_written", "executed with another payload"),
    (
        "bad_row_sent",
        "promises",
        "bad_rows_never_sent",
        f"bad row 8 {K[8]!r} (bad_method) was sent",
    ),
    ("lane_out_of_order", "promises", "lanes_in_order", "lane L executed out of order: row 1"),
    (
        "lane_behind_finished_head",
        "finished_heads",
        "lanes_move_on_after_a_finished_head",
        f"row 2 {K[2]!r} (behind_head",
    ),
    ("refused_method_resent", "refusals", "refused_methods_held", "sent again by daemon 0-1"),
]
#: The seams of issue 9, each broken.
SEAM_CASES = [
    ("lane_race", "one_row_of_a_lane_in_flight", "lane R: rows 1 and 0 in flight at once"),
    ("method_edit", "one_method_per_key", "one key sent to 2 methods"),
    ("method_edit", "one_request_per_key", "one key sent with 2 different"),
    ("method_edit", "every_row_ends_where_its_kind_says", "method edited"),
    ("key_reuse", "every_row_ends_where_its_kind_says", "reuses the key of purged committed row 4"),
    (
        "expired_after_executing",
        "nothing_executed_then_dropped",
        f"row 5 {K[5]!r} (expires, api, lane=None): executed at Recrypt but ended expired",
    ),
    ("poison", "every_row_ends_where_its_kind_says", f"row 6 {K[6]!r} (poison_surrogate"),
    ("response", "every_response_kept", "the answer's response was lost"),
    (
        "operator_cancel",
        "nothing_executed_then_dropped",
        f"row 8 {K[8]!r} (plain, api, lane=None): executed at Recrypt but cancelled",
    ),
]
#: The answers of issue 10, each misread as before it.
ANSWER_CASES = [
    ("429_parked", "every_row_ends_where_its_kind_says", "parked object_limit, but Recrypt's"),
    (
        "429_parked",
        "every_answer_read_as_the_policy_says",
        "'429 Too Many Requests' and the daemon recorded park; the policy says hand_back",
    ),
    (
        "failed_to_connect",
        "errors_after_effect_marked_maybe_executed",
        f"row 1 {K[1]!r} (failed_to_connect, api, lane=None): executed at Recrypt on a ",
    ),
    (
        "failed_to_connect",
        "every_answer_read_as_the_policy_says",
        "recorded hand_back; the policy says park or retry",
    ),
    ("failed_to_connect", "no_new_key_committed_as_used_before", "committed as 'key used before'"),
    (
        "failed_to_connect_expires",
        "errors_after_effect_marked_maybe_executed",
        f"row 2 {K[2]!r} (failed_to_connect_expires, api, lane=None): executed at Recrypt ",
    ),
    (
        "storm_uncounted",
        "every_row_ends_where_its_kind_says",
        f"{K[3]!r} (storm_doomed_executed, sql, lane=None): DEADLINE_EXCEEDED vgw-db on every",
    ),
    (
        "storm_uncounted",
        "every_answer_read_as_the_policy_says",
        "'vgw-db transaction timed out' and the daemon recorded hand_back",
    ),
    ("storm_parked_early", "every_row_ends_where_its_kind_says", "after 11 unknown outcomes"),
    (
        "refused_retried",
        "every_answer_read_as_the_policy_says",
        "PERMISSION_DENIED 'may not call PlaceOrder' and the daemon recorded retry",
    ),
]


def _ids(cases: list[tuple[str, ...]]) -> list[str]:
    return [f"{case[0]}-{case[-2]}" for case in cases]


@pytest.mark.parametrize(
    ("case", "scene", "promise", "expected"), PROMISE_CASES, ids=_ids(PROMISE_CASES)
)
def test_the_checks_catch_each_broken_promise(
    case: str, scene: str, promise: str, expected: str
) -> None:
    del case  # the test id's
    _caught(scene, promise, expected)


@pytest.mark.parametrize(("seam", "promise", "expected"), SEAM_CASES, ids=_ids(SEAM_CASES))
def test_the_checks_catch_each_broken_seam(seam: str, promise: str, expected: str) -> None:
    del seam  # the test id's
    _caught("seams", promise, expected)


@pytest.mark.parametrize(("answer", "promise", "expected"), ANSWER_CASES, ids=_ids(ANSWER_CASES))
def test_the_checks_catch_each_wrong_answer(answer: str, promise: str, expected: str) -> None:
    del answer  # the test id's
    _caught("answers", promise, expected)


def test_every_promise_has_a_case_that_breaks_it() -> None:
    broken = {case[-2] for case in [*PROMISE_CASES, *SEAM_CASES, *ANSWER_CASES]}
    assert set(promise_names()) == broken


def test_the_checks_let_the_right_behaviour_be() -> None:
    """What is right next to each broken seam and answer is not caught."""
    seams = "\n".join(_found("seams"))
    assert "out of order" not in seams  # row 0 was not visible yet when row 1 was sent
    assert f"row 4 {K[3]!r}" not in seams  # the purged original is fine
    answers = _found("answers")
    assert not [line for line in answers if {K[5], K[6], K[8]} & set(line.split("'"))], answers


def test_a_lane_moves_on_behind_its_finished_head_only() -> None:
    """Two lanes wait behind a finished row (cancelled, or cancelled by hand without a
    LaneKeeper run); the requeued head's lane moved on, the parked head's lane waits."""
    found = _found("finished_heads")
    text = "\n".join(found)
    assert f"row 2 {K[2]!r} (behind_head, sql, lane=U): waits behind a finished row" in text
    assert "its lane's parked head was finished: row 0, cancel;" in text
    assert f"row 6 {K[6]!r} (behind_head, sql, lane=H): waits behind a finished row" in text
    assert len(found) == 2, found


def test_a_refused_method_resent_at_every_probe_is_caught() -> None:
    """Only the daemon that looped is caught: not the one that held the method, nor the one
    a SIGHUP released, nor the one whose probe failed."""
    found = _found("refusals")
    assert len(found) == 2, found
    assert all("sent again by daemon 0-1" in line for line in found), found


def test_a_call_left_over_after_its_key_executed_holds_no_lane() -> None:
    """A cancelled call may sit on in the simulator; once its key executed it is harmless."""
    catalog = Catalog.load()
    x, y = str(uuid.uuid4()), str(uuid.uuid4())
    specs = [
        RowSpec(0, x, TRANSFER, BODY, "lane", "sql", lane="Q", visible_at=NOW),
        RowSpec(1, y, TRANSFER, BODY, "lane", "sql", lane="Q", visible_at=NOW),
    ]
    rows = {x: _row(1, "committed"), y: _row(2, "committed")}
    observed = Observed(
        [_entry(catalog, x, BODY, at=0.4), _entry(catalog, y, BODY, at=0.6)],
        [
            _span(x, 0.0, 1.5, code="ALREADY_EXISTS"),  # abandoned by its caller, answered late
            _span(x, 0.35, 0.4, executed=True),  # the resend that executed
            _span(y, 0.5, 0.6, executed=True),
        ],
    )
    found = check(specs, Table(rows), observed, catalog)
    assert not [line for line in found if "in flight at once" in line], found


def test_a_lane_row_claimed_before_the_earlier_row_was_visible_may_run_first() -> None:
    """The lane race under CPU starvation (seed 185558, MariaDB, load ~12): B was claimed
    before A's late commit, but its call reached the simulator 60 ms after that commit had
    returned. The harness saw B claimed then (``raced_with``): no violation. The same order
    with B not yet claimed at A's commit is still one."""
    catalog = Catalog.load()
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    rows = {a: _row(1, "committed"), b: _row(2, "committed")}
    observed = Observed(
        [_entry(catalog, b, BODY, at=0.7), _entry(catalog, a, BODY, at=0.8)],
        [_span(b, 0.06, 0.7, executed=True), _span(a, 0.75, 0.8, executed=True)],
    )
    for raced, expected in ((b, []), (None, ["lane Q executed out of order: row 1"])):
        specs = [
            RowSpec(0, a, TRANSFER, BODY, "lane", "sql", lane="Q", visible_at=NOW),
            RowSpec(1, b, TRANSFER, BODY, "lane", "sql", lane="Q", visible_at=NOW),
        ]
        specs[0].raced_with = raced
        found = [line for line in check(specs, Table(rows), observed, catalog) if "order" in line]
        assert [e for e in expected if not any(e in line for line in found)] == [], found
        assert bool(found) == bool(expected), found


class _RaceDuringPurge(Database):
    """The race of ``purge_finished``: a row inserted and finished just after the rows were
    read, and purged with the others (as a daemon can do between the read and the purge)."""

    def __init__(self, url: str, late: RowSpec) -> None:
        super().__init__(url)
        self.late: RowSpec | None = late

    def rows(self) -> dict[str, dict[str, object]]:
        found = super().rows()
        late, self.late = self.late, None
        if late is not None:
            self.insert(late)
            self.store.cancel(late.key, "test", "finished at once", datetime.now(UTC), False)
        return found


def test_a_row_purged_unseen_is_not_lost(sqlite_url: str) -> None:
    """Retention purges a row the harness never read: it is reported purged, not lost."""
    first = RowSpec(0, str(uuid.uuid4()), TRANSFER, BODY, "plain", "sql")
    late = RowSpec(1, str(uuid.uuid4()), TRANSFER, BODY, "plain", "sql")
    db = _RaceDuringPurge(sqlite_url, late)
    try:
        db.insert(first)
        db.store.cancel(first.key, "test", "finished", datetime.now(UTC), False)
        gone = {str(row["idempotency_key"]): row for row in db.purge_finished()}
    finally:
        db.dispose()
    assert gone[first.key]["state"] == "cancelled"
    assert gone.get(late.key, {}).get("state") == "purged", gone
    found = check([late], Table({}, {late.key: [gone[late.key]]}), Observed([]), Catalog.load())
    assert found == [], found


def test_a_reload_forgets_refusals_in_the_daemon_log() -> None:
    """What a daemon may hold: methods refused to it since its last SIGHUP."""
    log = "\n".join(
        [
            f"t0 info outbox.daemon event=handed_back key=k1 method={TRANSFER} "
            "code=PERMISSION_DENIED attempt=1",
            "t1 info outbox.daemon event=reloaded worker=w applied=recrypt",
            f"t2 info outbox.daemon event=handed_back key=k2 method={CANCEL_ORDER} "
            "code=PERMISSION_DENIED attempt=1",
            f"t3 info outbox.daemon event=handed_back key=k3 method={PLACE_ORDER} "
            "code=UNAUTHENTICATED attempt=1",
        ]
    )
    assert refused_since_reload(log) == {CANCEL_ORDER}


def test_general_unknowns_never_run_a_row_out_of_attempts() -> None:
    """General faults that count as unknown outcomes draw on a per-key budget."""
    budget = UnknownBudget(2)
    first = ChaosFault(C.UNKNOWN, "unexpected error", budget=budget)
    second = ChaosFault(C.DATA_LOSS, "data loss", budget=budget)
    assert first.matches(TRANSFER, "k") and second.matches(TRANSFER, "k")
    assert not first.matches(TRANSFER, "k") and not second.matches(TRANSFER, "k")
    assert first.matches(TRANSFER, "other")
    assert counts_unknown(C.UNAVAILABLE, FAILED_TO_CONNECT)
    assert not counts_unknown(C.UNAVAILABLE, "vgw-db: rollover in progress")
    assert counts_unknown(C.DEADLINE_EXCEEDED, VGW_DB_DEADLINE)
    assert not counts_unknown(C.RESOURCE_EXHAUSTED, "429 Too Many Requests")
