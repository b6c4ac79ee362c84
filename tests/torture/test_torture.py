"""The CI-sized torture run on SQLite, PostgreSQL and MariaDB (see ``harness``).

The seed is printed with the figures; ``OUTBOX_TORTURE_SEED`` replays one. The long run is
``python -m tests.torture --minutes 10 --db postgresql --restart-postgres --seed N``.
"""

from __future__ import annotations

import os
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from outbox.descriptors import Catalog
from outbox.simulator import CANCEL_ORDER, PLACE_ORDER, TRANSFER, LedgerEntry
from tests.torture.answers import refused_since_reload
from tests.torture.checks import Observed, Table, check, check_refusals, expected_request
from tests.torture.database import Database
from tests.torture.harness import run_torture
from tests.torture.parts import (
    API_KEY,
    FAILED_TO_CONNECT,
    VGW_DB_DEADLINE,
    C,
    ChaosFault,
    Probe,
    RefusalWindow,
    Reload,
    RowSpec,
    Span,
    UnknownBudget,
    counts_unknown,
)
from tests.torture.seams import poison_kinds

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
#: The answers of issue 10 (``answers`` and ``parts.GENERAL``): each in every CI-sized run.
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


def test_the_checks_catch_each_broken_promise() -> None:
    catalog = Catalog.load()
    keys = [str(uuid.uuid4()) for _ in range(6)]
    specs = [
        RowSpec(0, keys[0], TRANSFER, BODY, "lane", "sql", lane="L"),
        RowSpec(1, keys[1], TRANSFER, BODY, "lane", "api", lane="L"),
        RowSpec(2, keys[2], TRANSFER, BODY, "doom:precondition", "api", park="precondition"),
        RowSpec(3, keys[3], TRANSFER, BODY, "plain", "sql"),
        RowSpec(4, keys[4], TRANSFER, BODY, "plain", "sql"),
        RowSpec(5, keys[5], TRANSFER, BODY, "plain", "sql"),
    ]
    rows = {
        keys[0]: _row(1, "committed"),
        keys[1]: _row(2, "committed"),
        keys[2]: _row(3, "committed"),  # should have parked
        keys[3]: _row(4, "committed"),  # committed without an effect
        keys[4]: _row(5, "committed"),  # executed with another payload
    }  # keys[5]: lost
    observed = Observed(
        [
            _entry(catalog, keys[1], BODY),  # lane out of order
            _entry(catalog, keys[0], BODY),
            _entry(catalog, keys[2], BODY),
            _entry(catalog, keys[4], {**BODY, "amount": "2.00"}),
        ]
    )
    found = "\n".join(check(specs, Table(rows), observed, catalog))
    assert "out of order" in found
    assert f"{keys[2]!r} (doom:precondition" in found and "must be parked precondition" in found
    assert f"{keys[3]!r} (plain" in found and "executions=0" in found
    assert "another payload" in found
    assert f"{keys[5]!r} (plain, sql, lane=None): lost" in found


def test_the_checks_catch_each_broken_seam() -> None:
    catalog = Catalog.load()
    k = [str(uuid.uuid4()) for _ in range(9)]
    late = RowSpec(0, k[0], TRANSFER, BODY, "lane", "sql", lane="R", visible_at=NOW)
    early = RowSpec(1, k[1], TRANSFER, BODY, "lane", "sql", lane="R", visible_at=NOW)
    edited = RowSpec(2, k[2], PLACE_ORDER, {"account": "t"}, "method_edit", "sql")
    edited.edited_to, edited.edited_after_send = CANCEL_ORDER, True
    reused = RowSpec(3, k[3], TRANSFER, {**BODY, "amount": "3.00"}, "key_reuse", "sql")
    reused.reused_from = 4
    original = RowSpec(4, k[3], TRANSFER, BODY, "plain", "sql")
    expired = RowSpec(5, k[5], TRANSFER, BODY, "expires", "api")
    poison = RowSpec(6, k[6], TRANSFER, "{}", "poison_surrogate", "sql", park="bad_row")
    answered = RowSpec(7, k[7], TRANSFER, BODY, "plain", "api")
    cancelled = RowSpec(8, k[8], TRANSFER, BODY, "plain", "api", cancelled=True)
    specs = [late, early, edited, reused, original, expired, poison, answered, cancelled]
    rows = {
        k[0]: _row(1, "committed"),
        k[1]: _row(2, "committed"),
        k[2]: _row(3, "parked", "precondition"),  # sent to the edited method instead
        k[3]: _row(9, "committed"),  # the reused key committed on ALREADY_EXISTS
        k[5]: _row(5, "expired"),  # but it executed
        k[6]: _row(6, "pending"),  # the poison row never parked
        k[7]: _row(7, "committed"),  # without the response it was answered
        k[8]: _row(8, "cancelled"),  # but it executed
    }
    purged = {k[3]: [_row(4, "committed")]}
    observed = Observed(
        [
            _entry(catalog, k[0], BODY, at=0.3),
            _entry(catalog, k[1], BODY, at=0.6),
            _entry(catalog, k[3], BODY),
            _entry(catalog, k[5], BODY),
            _entry(catalog, k[7], BODY, transfer_id="t-7"),
            _entry(catalog, k[8], BODY),
        ],
        [
            _span(k[1], 0.0, 0.6),  # the later row held...
            _span(k[0], 0.2, 0.3),  # ...while the earlier one (committed late) was sent
            _span(k[2], 1.0, 1.1, PLACE_ORDER, code="DEADLINE_EXCEEDED"),
            _span(k[2], 2.0, 2.1, CANCEL_ORDER, code="FAILED_PRECONDITION", request={}),
            _span(k[7], 3.0, 3.1, executed=True),
        ],
    )
    found = "\n".join(check(specs, Table(rows, purged), observed, catalog))
    assert "lane R: rows 1 and 0 in flight at once" in found
    assert "out of order" not in found  # row 0 was not visible yet when row 1 was sent
    assert "one key sent to 2 methods" in found and "one key sent with 2 different" in found
    assert "method edited" in found
    assert "reuses the key of purged committed row 4" in found
    assert f"row 4 {k[3]!r}" not in found  # the purged original is fine
    assert f"row 5 {k[5]!r} (expires, api, lane=None): executed at Recrypt but ended expired" in (
        found
    )
    assert f"row 6 {k[6]!r} (poison_surrogate" in found
    assert "the answer's response was lost" in found
    assert f"row 8 {k[8]!r} (plain, api, lane=None): executed at Recrypt but cancelled" in found


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


def test_the_checks_catch_a_lane_left_behind_its_finished_head() -> None:
    """A parked lane head an operator finished (``lanes``): its lane must move on. A row of
    it still pending at the end waits behind a finished row; a lane whose head is still
    parked holds its rows, as before."""
    catalog = Catalog.load()
    k = [str(uuid.uuid4()) for _ in range(9)]
    lanes = ["U", "U", "U", "V", "V", "H", "H", "P", "P"]
    specs = [
        RowSpec(i, k[i], TRANSFER, BODY, "behind_head", "sql", lane=lane, visible_at=NOW)
        for i, lane in enumerate(lanes)
    ]
    for i, how in ((0, "cancel"), (3, "requeue"), (5, "sql"), (7, None)):
        specs[i].kind, specs[i].park, specs[i].unblocked = "lane_head", "precondition", how
    rows = {
        k[0]: _row(1, "cancelled"),
        k[1]: _row(2, "committed"),
        k[2]: _row(3, "pending"),  # waits behind the cancelled head
        k[3]: _row(4, "committed"),  # requeued with the fault cleared: committed
        k[4]: _row(5, "committed"),
        k[5]: _row(6, "cancelled"),  # by hand
        k[6]: _row(7, "pending"),  # no LaneKeeper released it
        k[7]: _row(8, "parked", "precondition"),
        k[8]: _row(9, "pending"),  # behind a parked head: fine
    }
    observed = Observed([_entry(catalog, k[i], BODY, at=i) for i in (1, 3, 4)])
    found = check(specs, Table(rows), observed, catalog)
    text = "\n".join(found)
    assert f"row 2 {k[2]!r} (behind_head, sql, lane=U): waits behind a finished row" in text
    assert "its lane's parked head was finished: row 0, cancel;" in text
    assert f"row 6 {k[6]!r} (behind_head, sql, lane=H): waits behind a finished row" in text
    assert len(found) == 2, found


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


# --------------------------------------------------------------------------- issue 10's answers


def _line(code: str, decision: str, said: str) -> dict[str, object]:
    return {"code": code, "decision": decision, "message": f"explanation; Recrypt said: {said}"}


def _storm_history(count: int) -> list[dict[str, object]]:
    retries = [_line("DEADLINE_EXCEEDED", "retry", VGW_DB_DEADLINE)] * (count - 1)
    return [*retries, _line("DEADLINE_EXCEEDED", "park", VGW_DB_DEADLINE)]


def test_the_checks_catch_each_wrong_answer() -> None:
    """What the daemon did before issue 10, row by row: each is caught, and the right
    behaviour next to it is not."""
    catalog = Catalog.load()
    k = [str(uuid.uuid4()) for _ in range(9)]
    storm = "storm_doomed_executed"
    specs = [
        RowSpec(0, k[0], TRANSFER, BODY, "plain", "sql"),  # got "429 Too Many Requests"
        RowSpec(1, k[1], TRANSFER, BODY, "failed_to_connect", "api"),
        RowSpec(2, k[2], TRANSFER, BODY, "failed_to_connect_expires", "api"),
        RowSpec(3, k[3], TRANSFER, BODY, storm, "sql", park="unknown_outcome"),
        RowSpec(4, k[4], TRANSFER, BODY, "storm_doomed", "sql", park="unknown_outcome"),
        RowSpec(5, k[5], TRANSFER, BODY, storm, "api", park="unknown_outcome"),  # right
        RowSpec(6, k[6], TRANSFER, BODY, "failed_to_connect", "sql"),  # right
        RowSpec(7, k[7], PLACE_ORDER, {"account": "t"}, "refused_method", "api"),
        RowSpec(8, k[8], TRANSFER, BODY, "plain", "api"),  # got "rate limit ..., retry in 1s"
    ]
    maybe = {"maybe_executed": True}
    rows = {
        k[0]: _row(1, "parked", "object_limit", last_code="RESOURCE_EXHAUSTED"),
        k[1]: _row(2, "committed"),  # handed back as never sent, then "key used before"
        k[2]: _row(3, "expired"),  # handed back as never sent, then expired
        k[3]: _row(4, "pending", **maybe),  # vgw-db deadlines not counted: never parks
        k[4]: _row(5, "parked", "unknown_outcome", **maybe),  # parked one too early
        k[5]: _row(6, "parked", "unknown_outcome", **maybe),
        k[6]: _row(7, "committed", **maybe),
        k[7]: _row(8, "committed"),
        k[8]: _row(9, "committed"),
    }
    history = {
        k[0]: [_line("RESOURCE_EXHAUSTED", "park", "429 Too Many Requests")],
        k[1]: [
            _line("UNAVAILABLE", "hand_back", FAILED_TO_CONNECT),
            _line("ALREADY_EXISTS", "commit_key_used_before", "already used"),
        ],
        k[3]: [
            *[_line("DEADLINE_EXCEEDED", "retry", VGW_DB_DEADLINE)] * 20,
            _line("DEADLINE_EXCEEDED", "hand_back", VGW_DB_DEADLINE),  # as if a rollover
        ],
        k[4]: _storm_history(11),
        k[5]: _storm_history(12),
        k[6]: [
            _line("UNAVAILABLE", "retry", FAILED_TO_CONNECT),
            _line("ALREADY_EXISTS", "commit", "already used"),
        ],
        k[7]: [_line("PERMISSION_DENIED", "retry", "may not call PlaceOrder")],
        k[8]: [
            _line("RESOURCE_EXHAUSTED", "hand_back", "rate limit exceeded, retry in 1s"),
            _line("OK", "commit", ""),
        ],
    }
    ftc = {"code": "UNAVAILABLE", "message": FAILED_TO_CONNECT, "executed": True}
    observed = Observed(
        [_entry(catalog, key, BODY) for key in (k[1], k[2], k[5], k[6], k[8])],
        [
            _span(k[0], 0.0, 0.1, code="RESOURCE_EXHAUSTED", message="429 Too Many Requests"),
            _span(k[1], 0.0, 0.1, **ftc),
            _span(k[2], 0.0, 0.1, **ftc),
            _span(k[6], 0.0, 0.1, **ftc),
            *(
                _span(key, 0.0, 0.1, code="DEADLINE_EXCEEDED", message=VGW_DB_DEADLINE)
                for key in (k[3], k[4], k[5])
            ),
        ],
    )
    found = check(specs, Table(rows, {}, history), observed, catalog, max_unknown=12)
    text = "\n".join(found)
    assert "parked object_limit, but Recrypt's RESOURCE_EXHAUSTED answers to it were" in text
    assert "'429 Too Many Requests' and the daemon recorded park; the policy says hand_back" in (
        text
    )
    assert f"row 1 {k[1]!r} (failed_to_connect, api, lane=None): executed at Recrypt on a " in (
        text
    )
    assert "recorded hand_back; the policy says park or retry" in text
    assert "committed as 'key used before'" in text
    assert f"row 2 {k[2]!r} (failed_to_connect_expires, api, lane=None): executed at Recrypt " in (
        text
    )
    assert f"{k[3]!r} ({storm}, sql, lane=None): DEADLINE_EXCEEDED vgw-db on every call" in text
    assert f"{k[4]!r} (storm_doomed, sql, lane=None): DEADLINE_EXCEEDED vgw-db" in text
    assert "after 11 unknown outcomes in its history" in text
    assert "PERMISSION_DENIED 'may not call PlaceOrder' and the daemon recorded retry" in text
    assert "'vgw-db transaction timed out' and the daemon recorded hand_back" in text
    assert not [line for line in found if {k[5], k[6], k[8]} & set(line.split("'"))], found


def test_a_refused_method_resent_at_every_probe_is_caught() -> None:
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
    probes = [
        probe(looped, 0.9),
        probe(looped, 2.0),
        probe(held, 0.9),
        probe(unsure, 0.9, "UNAVAILABLE"),
    ]
    reloads = [Reload(NOW + timedelta(seconds=0.5), frozenset({reloaded}))]
    observed = Observed([], spans, probes=probes, reloads=reloads, windows=[window])
    found = check_refusals(observed)
    assert len(found) == 2, found
    assert all("sent again by daemon 0-1" in line for line in found), found


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
