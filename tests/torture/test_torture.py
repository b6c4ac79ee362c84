"""The CI-sized torture run on SQLite, PostgreSQL and MariaDB (see ``harness``).

The seed is printed with the figures; ``OUTBOX_TORTURE_SEED`` replays one. The long run is
``python -m tests.torture --minutes 10 --db postgresql --restart-postgres --seed N``.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.torture.harness import run_torture

SEED = int(os.environ.get("OUTBOX_TORTURE_SEED") or random.SystemRandom().randrange(10**6))
DURATION_S = float(os.environ.get("OUTBOX_TORTURE_SECONDS", "15"))


@pytest.mark.timeout(300)
def test_torture_keeps_the_promise(db_url, tmp_path) -> None:
    report = run_torture(db_url, SEED, DURATION_S, workdir=tmp_path, settle_s=90.0)
    print(report.line())
    assert report.violations == [], (
        f"{report.line()}\nreplay: OUTBOX_TORTURE_SEED={SEED} (logs in {tmp_path})\n"
        + "\n".join(report.violations[:30])
    )
