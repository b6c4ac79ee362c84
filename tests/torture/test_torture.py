"""The CI-sized torture run on SQLite, PostgreSQL and MariaDB (see ``harness``).

The seed is printed with the figures; ``OUTBOX_TORTURE_SEED`` replays one. The long run is
``python -m tests.torture --minutes 10 --db postgresql --restart-postgres --seed N``.
"""

from __future__ import annotations

import os
import random
import uuid
from datetime import UTC, datetime

import pytest

from outbox.descriptors import Catalog
from outbox.simulator import TRANSFER, CallRecord, LedgerEntry
from tests.torture.harness import RowSpec, check, expected_request, run_torture

SEED = int(os.environ.get("OUTBOX_TORTURE_SEED") or random.SystemRandom().randrange(10**6))
DURATION_S = float(os.environ.get("OUTBOX_TORTURE_SECONDS", "20"))


@pytest.mark.timeout(300)
def test_torture_keeps_the_promise(db_url, tmp_path) -> None:
    report = run_torture(db_url, SEED, DURATION_S, workdir=tmp_path, settle_s=90.0)
    print(report.line())
    assert report.violations == [], (
        f"{report.line()}\nreplay: OUTBOX_TORTURE_SEED={SEED} (logs in {tmp_path})\n"
        + "\n".join(report.violations[:30])
    )
    # The run really was a torture: each kind of chaos happened and faults met real calls.
    assert report.kills and report.conn_cuts and report.sim_restarts, report.line()
    assert report.extra["fault_hits"] >= 10, report.line()
    assert report.extra["executed_errored"] >= 1, report.line()  # executed, then errored


class _Ledger:
    """A stand-in for the simulator's observations, to show the checks are not vacuous."""

    def __init__(self, entries: list[LedgerEntry], calls: tuple[CallRecord, ...] = ()) -> None:
        self.ledger = entries
        self.calls = list(calls)

    def executed_keys(self) -> set[str]:
        return {e.key for e in self.ledger}

    def executions(self, key: str) -> int:
        return sum(1 for e in self.ledger if e.key == key)


def test_the_checks_catch_each_broken_promise() -> None:
    catalog = Catalog.load()
    now = datetime.now(UTC)
    keys = [str(uuid.uuid4()) for _ in range(6)]
    body = {"fromAccount": "a", "toAccount": "b", "amount": "1.00"}
    specs = [
        RowSpec(0, keys[0], TRANSFER, body, "lane", "sql", lane="L"),
        RowSpec(1, keys[1], TRANSFER, body, "lane", "api", lane="L"),
        RowSpec(2, keys[2], TRANSFER, body, "doom:precondition", "api", park="precondition"),
        RowSpec(3, keys[3], TRANSFER, body, "plain", "sql"),
        RowSpec(4, keys[4], TRANSFER, body, "plain", "sql"),
        RowSpec(5, keys[5], TRANSFER, body, "plain", "sql"),
    ]

    def entry(key: str, payload: dict[str, str]) -> LedgerEntry:
        request = expected_request(RowSpec(0, key, TRANSFER, payload, "plain", "sql"), catalog)
        return LedgerEntry(key, TRANSFER, request, now, {})

    def row(state: str, reason: str | None = None) -> dict[str, object]:
        return {
            "state": state,
            "park_reason": reason,
            "maybe_executed": False,
            "last_code": None,
            "last_message": None,
        }

    rows = {
        keys[0]: row("committed"),
        keys[1]: row("committed"),
        keys[2]: row("committed"),  # should have parked
        keys[3]: row("committed"),  # committed without an effect
        keys[4]: row("committed"),  # executed with another payload
    }  # keys[5]: lost
    sim = _Ledger(
        [
            entry(keys[1], body),  # lane out of order
            entry(keys[0], body),
            entry(keys[2], body),
            entry(keys[4], {**body, "amount": "2.00"}),
        ]
    )
    found = "\n".join(check(specs, rows, sim, catalog))
    assert "out of order" in found
    assert f"{keys[2]} (doom:precondition" in found and "must be parked precondition" in found
    assert f"{keys[3]} (plain" in found and "executions=0" in found
    assert "another payload" in found
    assert f"{keys[5]} (plain, sql, lane=None): lost" in found
