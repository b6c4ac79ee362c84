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
from tests.torture.checks import Observed, Table, check, expected_request
from tests.torture.harness import run_torture
from tests.torture.parts import API_KEY, RowSpec, Span
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
    for seam in SEAMS:
        assert report.faults[seam] >= 1, (seam, report.line())
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
