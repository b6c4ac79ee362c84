"""``outbox check`` warns on what the guide says a human must look at (issue 10).

Each warning fires past its ``[check]`` threshold and stays silent below it: a rollover gate
closed longer than the guide's 3 minutes, a maintenance pause (and how long it has lasted),
methods Recrypt refused outside maintenance, rows retrying long since they first became due,
and rows with many attempts. Only live workers count. Real databases, the real command line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from outbox import health
from outbox.config import load
from outbox.daemon import Daemon
from outbox.gates import GATE_STATES
from outbox.policy import Gate
from outbox.schema import messages
from outbox.simulator import Simulator
from outbox.store import Store, WorkerBeat
from tests.integration.test_cli import Cli

TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"
PLACE_ORDER = "/recrypt.market.v1.Market/PlaceOrder"
RATE_LIMITED = "rate limited (RESOURCE_EXHAUSTED): dispatcher throttled; Recrypt said: slow down"
MINUTE = 60.0
HOUR = 3600.0


@pytest.fixture
def cli(db_url: str) -> Cli:
    return Cli(db_url)


@pytest.fixture
def store(engine: Engine) -> Store:
    return Store(engine)


def now() -> datetime:
    return datetime.now(UTC)


def beat(
    store: Store,
    worker_id: str = "w1",
    *,
    gate: str = "open",
    closed_ago: float | None = None,
    refused: tuple[str, ...] = (),
    beat_ago: float = 0.0,
) -> None:
    """A worker's heartbeat as the daemon writes it; ``closed_ago``: its gate closed then."""
    at = now()
    new: dict[str, Any] = {}  # only what is given: a plain beat works on any version
    if closed_ago is not None:
        new["gate_since"] = at - timedelta(seconds=closed_ago)
    if refused:
        new["refused_methods"] = refused
    started = at - timedelta(hours=1)
    made = WorkerBeat(worker_id, "host", 1, "0.1.0", started, gate, f"because {gate}", **new)
    store.heartbeat(made, at - timedelta(seconds=beat_ago))


def retried_row(
    cli: Cli,
    engine: Engine,
    *,
    due_ago: float,
    attempts: int,
    code: str | None = "RESOURCE_EXHAUSTED",
    message: str | None = RATE_LIMITED,
) -> str:
    """A pending row first due ``due_ago`` s ago, tried ``attempts`` times, next try later.

    The next try is in the future, so the row is not due now: the oldest-due thresholds stay
    silent and each test sees only the warning it is about.
    """
    key = cli.enqueue()
    with engine.begin() as conn:
        conn.execute(
            messages.update()
            .where(messages.c.idempotency_key == key)
            .values(
                created_at=now() - timedelta(seconds=due_ago),
                attempts=attempts,
                last_code=code,
                last_message=message,
                next_attempt_at=now() + timedelta(minutes=2),
            )
        )
    return key


def config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "outbox.toml"
    path.write_text(text)
    return str(path)


def check(cli: Cli, code: int, *args: str) -> str:
    """``outbox check``'s one line (exit ``code``)."""
    out = cli.invoke(*args, "check", code=code).stdout
    assert len(out.splitlines()) == 1, out
    return out.strip()


# --------------------------------------------------------------------------- rollover


def test_rollover_under_the_guides_three_minutes_is_ok(cli: Cli, store: Store) -> None:
    beat(store, gate="rollover", closed_ago=2 * MINUTE)

    line = check(cli, 0)

    assert line.startswith("OK: ")
    assert "(gate rollover)" in line
    assert "recrypt.net" not in line


def test_rollover_past_three_minutes_warns_to_check_recrypt_net(cli: Cli, store: Store) -> None:
    beat(store, gate="rollover", closed_ago=4 * MINUTE)

    line = check(cli, 1)

    assert line.startswith("WARNING: 0 parked; no due rows; 1 live worker (gate rollover); ")
    assert line.endswith(
        "rollover (UNAVAILABLE vgw-db) for 4 min, over 3 min: check recrypt.net for a notice"
    )


def test_rollover_threshold_comes_from_the_config(cli: Cli, store: Store, tmp_path: Path) -> None:
    config = config_file(tmp_path, "[check]\nrollover_warning = 600\n")
    beat(store, gate="rollover", closed_ago=8 * MINUTE)
    assert check(cli, 0, "--config", config).startswith("OK: ")

    beat(store, gate="rollover", closed_ago=11 * MINUTE)
    assert "for 11 min, over 10 min: check recrypt.net" in check(cli, 1, "--config", config)


def test_rollover_of_a_dead_worker_does_not_count(cli: Cli, store: Store) -> None:
    beat(store, "w-dead", gate="rollover", closed_ago=HOUR, beat_ago=HOUR)
    beat(store, "w-live")

    line = check(cli, 0)

    assert "recrypt.net" not in line


def test_rollover_closed_since_an_unknown_time_still_warns(cli: Cli, store: Store) -> None:
    """A worker that beat before migration 0006 (an older daemon) records no ``gate_since``."""
    beat(store, gate="rollover")

    assert "since an unknown time: check recrypt.net for a notice" in check(cli, 1)


# --------------------------------------------------------------------------- maintenance


def test_maintenance_warns_at_once_by_default_and_says_how_long(cli: Cli, store: Store) -> None:
    beat(store, gate="maintenance", closed_ago=12 * MINUTE + 5)

    line = check(cli, 1)

    assert line.startswith("WARNING: 0 parked; no due rows; 1 live worker (gate maintenance); ")
    assert line.endswith(
        "Recrypt maintenance (PERMISSION_DENIED): paused 12 min; see https://x.com/RecryptCS"
    )


def test_maintenance_below_its_threshold_is_ok(cli: Cli, store: Store, tmp_path: Path) -> None:
    config = config_file(tmp_path, "[check]\nmaintenance_warning = 1800\n")
    beat(store, gate="maintenance", closed_ago=20 * MINUTE)
    assert check(cli, 0, "--config", config).startswith("OK: ")

    beat(store, gate="maintenance", closed_ago=3 * HOUR)
    assert "paused 3.0 h; see https://x.com/RecryptCS" in check(cli, 1, "--config", config)


def test_a_long_maintenance_is_a_warning_never_critical(cli: Cli, store: Store) -> None:
    beat(store, gate="maintenance", closed_ago=30 * HOUR)

    assert "paused 30.0 h" in check(cli, 1)


# --------------------------------------------------------------------------- refused methods


def test_refused_methods_are_named_with_what_to_do(cli: Cli, store: Store) -> None:
    beat(store, "w1", refused=(TRANSFER,))
    beat(store, "w2", refused=(PLACE_ORDER, TRANSFER))

    line = check(cli, 1)

    assert line.startswith("WARNING: 0 parked; no due rows; 2 live workers (gate open); ")
    assert line.endswith(
        "Recrypt refused Market/PlaceOrder, Wallet/Transfer outside maintenance "
        "(PERMISSION_DENIED), held: check the API key's permissions (key_access in the "
        "protos, recrypt.net/api), then systemctl reload outbox"
    )


def test_no_refused_methods_is_ok_and_dead_workers_do_not_count(cli: Cli, store: Store) -> None:
    beat(store, "w1")
    assert check(cli, 0).startswith("OK: ")

    beat(store, "w-dead", refused=(TRANSFER,), beat_ago=HOUR)
    assert check(cli, 0).startswith("OK: ")


# --------------------------------------------------------------------------- rows retrying


def test_rows_retrying_past_the_threshold_warn_with_the_same_answer(
    cli: Cli, engine: Engine, store: Store
) -> None:
    beat(store)
    retried_row(cli, engine, due_ago=20 * MINUTE, attempts=2)
    assert check(cli, 0).startswith("OK: ")  # under [check] retrying_warning (30 min)

    retried_row(cli, engine, due_ago=2 * HOUR + 5 * MINUTE, attempts=3)
    retried_row(cli, engine, due_ago=45 * MINUTE, attempts=1)

    line = check(cli, 1)
    assert line.startswith("WARNING: 0 parked; no due rows; 1 live worker (gate open); ")
    assert line.endswith(
        "2 rows retrying over 30 min since first due (oldest 125 min); rows keep getting "
        f'the same answer: RESOURCE_EXHAUSTED "{RATE_LIMITED}"; see outbox list --state pending'
    )


def test_a_row_handed_back_without_an_attempt_counts_as_retrying(
    cli: Cli, engine: Engine, store: Store
) -> None:
    """Rate limiting hands a row back without counting an attempt: its last answer counts."""
    beat(store)
    retried_row(cli, engine, due_ago=HOUR, attempts=0)

    assert "1 row retrying over 30 min since first due (oldest 60 min)" in check(cli, 1)


def test_rows_never_tried_are_not_retrying(cli: Cli, engine: Engine, store: Store) -> None:
    """Old rows not yet due, or never answered, are the oldest-due check's, not this one's."""
    beat(store)
    retried_row(cli, engine, due_ago=3 * HOUR, attempts=0, code=None, message=None)

    assert check(cli, 0).startswith("OK: ")


def test_rows_past_the_attempts_threshold_warn(cli: Cli, engine: Engine, store: Store) -> None:
    beat(store)
    retried_row(cli, engine, due_ago=MINUTE, attempts=9, code="UNAVAILABLE", message="vgw-db")
    assert check(cli, 0).startswith("OK: ")  # under [check] attempts_warning (10)

    retried_row(cli, engine, due_ago=MINUTE, attempts=14, code="UNAVAILABLE", message="vgw-db")
    retried_row(cli, engine, due_ago=MINUTE, attempts=10, code="UNAVAILABLE", message="vgw-db")
    retried_row(cli, engine, due_ago=MINUTE, attempts=11, code="DEADLINE_EXCEEDED", message="x")

    line = check(cli, 1)
    assert line.startswith("WARNING: 0 parked; no due rows; 1 live worker (gate open); ")
    assert line.endswith(
        "3 rows with 10 or more attempts (most 14); commonest last answer (2 of 3 rows): "
        'UNAVAILABLE "vgw-db"; see outbox list --state pending'
    )


def test_attempts_threshold_comes_from_the_config(
    cli: Cli, engine: Engine, store: Store, tmp_path: Path
) -> None:
    config = config_file(tmp_path, "[check]\nattempts_warning = 3\nretrying_warning = 7200\n")
    beat(store)
    retried_row(cli, engine, due_ago=HOUR, attempts=2)
    assert check(cli, 0, "--config", config).startswith("OK: ")

    retried_row(cli, engine, due_ago=MINUTE, attempts=3, code="UNAVAILABLE", message="vgw-db")
    line = check(cli, 1, "--config", config)
    assert '1 row with 3 or more attempts (most 3); its last answer: UNAVAILABLE "vgw-db"' in line


def test_a_row_both_long_and_many_is_counted_once_for_the_answer(
    cli: Cli, engine: Engine, store: Store
) -> None:
    beat(store)
    retried_row(cli, engine, due_ago=HOUR, attempts=12)

    line = check(cli, 1)

    assert "1 row retrying over 30 min since first due (oldest 60 min)" in line
    assert "1 row with 10 or more attempts (most 12)" in line
    assert f'its last answer: RESOURCE_EXHAUSTED "{RATE_LIMITED}"' in line


def test_parked_and_finished_rows_are_not_retrying(cli: Cli, engine: Engine, store: Store) -> None:
    beat(store)
    for state in ("committed", "cancelled"):
        key = retried_row(cli, engine, due_ago=HOUR, attempts=20)
        with engine.begin() as conn:
            conn.execute(
                messages.update().where(messages.c.idempotency_key == key).values(state=state)
            )

    assert check(cli, 0).startswith("OK: ")


def test_the_last_message_is_bounded_and_one_line(cli: Cli, engine: Engine, store: Store) -> None:
    beat(store)
    retried_row(cli, engine, due_ago=HOUR, attempts=1, message="line one\nline two " + "x" * 5000)

    line = check(cli, 1)

    assert '"line one line two xxx' in line
    assert "x" * 200 not in line
    assert len(line) < 500


# --------------------------------------------------------------------------- together


def test_every_warning_in_one_line_and_critical_stays_critical(
    cli: Cli, engine: Engine, store: Store
) -> None:
    beat(store, "w1", gate="rollover", closed_ago=5 * MINUTE)
    beat(store, "w2", gate="maintenance", closed_ago=2 * MINUTE)
    beat(store, "w3", refused=(TRANSFER,))
    retried_row(cli, engine, due_ago=HOUR, attempts=11)

    line = check(cli, 1)
    for part in (
        "check recrypt.net for a notice",
        "paused 2 min; see https://x.com/RecryptCS",
        "Recrypt refused Wallet/Transfer outside maintenance",
        "1 row retrying over 30 min",
        "1 row with 10 or more attempts",
    ):
        assert part in line

    beat(store, "w4", gate="unauthenticated", closed_ago=MINUTE)
    assert check(cli, 2).startswith("CRITICAL: ")


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("rollover_warning = 0", "[check] rollover_warning"),
        ("maintenance_warning = -1", "[check] maintenance_warning"),
        ("retrying_warning = 'long'", "[check] retrying_warning"),
        ("attempts_warning = 0", "[check] attempts_warning"),
        ("attempts_warning = 2.5", "[check] attempts_warning"),
        ("rollover_warnings = 60", "[check] rollover_warnings: unknown key"),
    ],
)
def test_bad_check_thresholds_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    config = config_file(tmp_path, f"[check]\n{text}\n")

    result = Cli("sqlite://").invoke("--config", config, "check", code=2)

    assert result.stdout.startswith("CRITICAL: cannot read the outbox: ")
    assert named in result.stdout
    if "unknown key" not in named:  # a known key, refused for its value
        assert "unknown key" not in result.stdout


def test_check_threshold_defaults() -> None:
    c = load(None, env={}).check

    assert (c.rollover_warning, c.maintenance_warning) == (180.0, 0.0)
    assert (c.retrying_warning, c.attempts_warning) == (1800.0, 10)


def test_the_gates_check_judges_are_gates() -> None:
    assert set(health.TIMED_GATES) <= set(GATE_STATES)
    assert set(health.TIMED_GATES) == {Gate.ROLLOVER, Gate.MAINTENANCE}


# --------------------------------------------------------------------------- status, store


def test_status_shows_gate_since_and_refused_methods(cli: Cli, store: Store) -> None:
    beat(store, "w1", gate="maintenance", closed_ago=12 * MINUTE)
    beat(store, "w2", refused=(PLACE_ORDER, TRANSFER))

    workers = {w["worker_id"]: w for w in cli.json("status")["workers"]}
    since = datetime.fromisoformat(workers["w1"]["gate_since"])
    assert timedelta(minutes=11) < now() - since < timedelta(minutes=13)
    assert workers["w1"]["refused_methods"] == []
    assert workers["w2"]["gate_since"] is None
    assert workers["w2"]["refused_methods"] == [PLACE_ORDER, TRANSFER]

    out = cli.invoke("status", COLUMNS="160").stdout
    assert re.search(r"w1 .* maintenance +12\.0 min ", out), out
    assert "w2 holds methods Recrypt refused outside maintenance: " in out
    assert "Market/PlaceOrder, Wallet/Transfer; check the API key's permissions" in out


def test_heartbeat_records_and_clears_gate_since_and_refused_methods(store: Store) -> None:
    beat(store, "w1", gate="rollover", closed_ago=MINUTE, refused=(TRANSFER,))
    (worker,) = store.list_workers()
    assert worker.gate_since is not None
    assert timedelta(seconds=50) < now() - worker.gate_since < timedelta(seconds=70)
    assert worker.refused_methods == (TRANSFER,)

    beat(store, "w1")
    (worker,) = store.list_workers()
    assert (worker.gate_since, worker.refused_methods) == (None, ())


def test_the_retrying_query_reads_pending_rows_through_an_index(store: Store) -> None:
    """No query on a timer scans the table: many finished rows, a few pending ones."""
    _fill(store.engine, finished=50_000 if store.dialect != "sqlite" else 5_000, pending=200)

    plan = store.explain_retrying(now() - timedelta(minutes=30), 10)

    if store.dialect == "postgresql":
        assert "Seq Scan on outbox_messages" not in plan, plan
        assert "ix_outbox_messages_" in plan, plan
    elif store.dialect == "sqlite":
        assert "USING INDEX ix_outbox_messages_" in plan, plan
        assert "SCAN outbox_messages" not in plan, plan
    else:
        assert "ix_outbox_messages_" in plan, plan
        assert " ALL " not in f" {plan} ", plan


def _fill(engine: Engine, *, finished: int, pending: int) -> None:
    rows: list[dict[str, Any]] = [
        {
            "idempotency_key": f"00000000-0000-4000-8000-{i:012d}",
            "method": TRANSFER,
            "payload": {},
            "state": "committed" if i < finished else "pending",
            "attempts": 1,
            "updated_at": now(),
        }
        for i in range(finished + pending)
    ]
    with engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            conn.execute(messages.insert(), rows[start : start + 5000])
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("ANALYZE outbox_messages"))
        elif engine.dialect.name == "sqlite":
            conn.execute(sa.text("ANALYZE"))
        else:
            conn.execute(sa.text("ANALYZE TABLE outbox_messages"))


# --------------------------------------------------------------------------- the daemon's beat


@pytest.fixture
def daemon(sqlite_url: str) -> Iterator[Daemon]:
    with Simulator(api_keys=["k"]) as sim:
        base = load(None, env={"RECRYPT_API_KEY": "k"})
        config = base.model_copy(
            update={
                "database": base.database.model_copy(update={"url": sqlite_url}),
                "recrypt": base.recrypt.model_copy(update={"target": sim.target, "tls": False}),
                "metrics": base.metrics.model_copy(update={"listen": ""}),
                "maintenance": base.maintenance.model_copy(update={"rollover_window": ""}),
            }
        )
        made = Daemon(config)
        yield made
        made.engine.dispose()


def test_the_daemons_heartbeat_carries_gate_since_and_refused_methods(daemon: Daemon) -> None:
    closed = daemon.clock()
    daemon.gates.on_answer(Gate.ROLLOVER, closed, "vgw-db")
    assert daemon._beat().gate_since == closed  # the heartbeat's source

    daemon.gates.on_answer(Gate.NONE, closed)
    daemon.gates.method_denied(TRANSFER)
    daemon.gates.on_answer(Gate.MAINTENANCE, closed)
    # MaintenanceCheck says there is no maintenance: the key may not call the method.
    daemon.gates.on_probe(True, closed, maintenance=False)
    made = daemon._beat()
    assert (made.gate, made.gate_since, made.refused_methods) == ("open", None, (TRANSFER,))
