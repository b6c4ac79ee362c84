"""The ``outbox`` command line, in process (click's CliRunner), against real databases.

Every invocation goes through ``Cli.invoke``, which also checks that the Recrypt API key
never shows in any output and that no command ends in a traceback.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy.engine import Engine

from outbox.cli import main
from outbox.schema import messages
from outbox.store import Store, WorkerBeat

API_KEY = "sekret-api-key-123"
TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"
CANCEL_ORDER = "/recrypt.market.v1.Market/CancelOrder"
PAYLOAD = {"fromAccount": "acc-1", "toAccount": "acc-2", "amount": "10.00", "currency": "AUD"}
ROW_FIELDS = {
    "idempotency_key",
    "method",
    "state",
    "attempts",
    "last_code",
    "last_message",
    "maybe_executed",
    "lane",
    "reference",
}


class Cli:
    """``outbox …`` on one database, with the API key in the environment."""

    def __init__(self, url: str) -> None:
        self.env: dict[str, str | None] = {
            "OUTBOX_DATABASE_URL": url,
            "RECRYPT_API_KEY": API_KEY,
            "OUTBOX_CONFIG": None,
            "COLUMNS": "100",
        }

    def invoke(self, *args: str, code: int = 0, **env: str | None) -> Result:
        result = CliRunner().invoke(main, list(args), env=self.env | env)
        output = result.stdout + result.stderr
        assert API_KEY not in output
        assert "Traceback" not in output
        assert result.exception is None or isinstance(result.exception, SystemExit), output
        assert result.exit_code == code, output
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.invoke(*args, "--json").stdout)

    def enqueue(self, *extra: str, method: str = TRANSFER, payload: Any = None) -> str:
        body = json.dumps(PAYLOAD if payload is None else payload)
        key = self.invoke("enqueue", method, "--json", body, *extra).stdout.strip()
        assert str(uuid.UUID(key)) == key
        return key


@pytest.fixture
def cli(db_url: str) -> Cli:
    return Cli(db_url)


@pytest.fixture
def store(engine: Engine) -> Store:
    return Store(engine)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``outbox run`` sets up the root logger for the daemon; give pytest its handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def park(engine: Engine, key: str, *, maybe_executed: bool, reason: str = "precondition") -> None:
    """There is no public "park": the dispatcher's outcome, written as the test's own SQL."""
    with engine.begin() as conn:
        conn.execute(
            messages.update()
            .where(messages.c.idempotency_key == key)
            .values(
                state="parked",
                park_reason=reason,
                maybe_executed=maybe_executed,
                last_code="FAILED_PRECONDITION",
                last_message="compliance question pending on recrypt.net",
            )
        )


def beat(store: Store, worker_id: str, *, gate: str = "open", ago: float = 0.0) -> None:
    now = datetime.now(UTC)
    started = now - timedelta(hours=1)
    store.heartbeat(
        WorkerBeat(worker_id, "host", 1, "0.1.0", started, gate, gate_reason=f"because {gate}"),
        now - timedelta(seconds=ago),
    )


# --------------------------------------------------------------------------- enqueue


def test_enqueue_prints_the_key_of_a_pending_row(cli: Cli) -> None:
    due = "2020-01-01T00:00:00Z"
    key = cli.enqueue("--lane", "acc-1", "--reference", "order-7", "--not-before", due)

    (row,) = cli.json("list")["rows"]
    assert row.keys() >= ROW_FIELDS
    assert row["idempotency_key"] == key
    assert (row["state"], row["lane"], row["reference"]) == ("pending", "acc-1", "order-7")
    assert row["not_before"] == "2020-01-01T00:00:00+00:00"
    assert row["maybe_executed"] is False


def test_enqueue_takes_the_key_and_the_payload_from_a_file(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "transfer.json"
    path.write_text(json.dumps(PAYLOAD))
    key = str(uuid.uuid4())

    made = cli.invoke("enqueue", TRANSFER, "--json", f"@{path}", "--key", key).stdout.strip()

    assert made == key
    assert cli.json("show", key)["row"]["payload"] == PAYLOAD


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["/recrypt.wallet.v1.Wallet/Nope", "--json", "{}"], "unknown method"),
        ([TRANSFER, "--json", '{"amount": 10.5}'], "amount"),
        ([TRANSFER, "--json", '{"fromAccount": '], "not valid JSON"),
        ([TRANSFER, "--json", "[1, 2]"], "must be a JSON object"),
        ([TRANSFER, "--json", "@/nonexistent/transfer.json"], "cannot read"),
        ([TRANSFER, "--json", "{}", "--not-before", "2030-01-01T10:00:00"], "add Z or +00:00"),
        ([TRANSFER, "--json", "{}", "--expires-at", "next tuesday"], "--expires-at"),
        ([TRANSFER, "--json", "{}", "--key", "NOT-A-UUID"], "not a lowercase UUID"),
    ],
)
def test_enqueue_refuses_bad_input_naming_the_problem(
    sqlite_url: str, args: list[str], expected: str
) -> None:
    cli = Cli(sqlite_url)

    result = cli.invoke("enqueue", *args, code=1)

    assert result.stderr.startswith("error: ")
    assert expected in result.stderr
    assert result.stdout == ""
    assert cli.json("list") == {
        "rows": [],
        "total": 0,
        "next_cursor": None,
        "total_is_a_lower_bound": False,
    }


def test_enqueue_refuses_a_duplicate_key(cli: Cli) -> None:
    key = cli.enqueue()

    result = cli.invoke("enqueue", TRANSFER, "--json", json.dumps(PAYLOAD), "--key", key, code=1)

    assert f"error: idempotency_key {key} is already in the outbox" in result.stderr
    assert len(cli.json("list")["rows"]) == 1


# --------------------------------------------------------------------------- list / show


def test_list_filters_by_state_method_and_lane(cli: Cli, engine: Engine) -> None:
    a = cli.enqueue("--lane", "one")
    b = cli.enqueue("--lane", "two")
    c = cli.enqueue(method=CANCEL_ORDER, payload={"account": "acc-1", "orderId": "o-1"})
    park(engine, b, maybe_executed=False)

    def keys(*args: str) -> list[str]:
        return [row["idempotency_key"] for row in cli.json("list", *args)["rows"]]

    assert keys() == [c, b, a]  # newest first
    assert keys("--state", "parked") == [b]
    assert keys("--state", "pending", "--method", TRANSFER) == [a]
    assert keys("--lane", "one") == [a]
    assert keys("--method", CANCEL_ORDER) == [c]
    assert keys("--limit", "1") == [c]
    assert keys("--state", "committed") == []
    cli.invoke("list", "--state", "nonsense", code=2)


def test_list_for_people_shows_full_keys_and_clips_long_messages(cli: Cli, engine: Engine) -> None:
    key = cli.enqueue()
    park(engine, key, maybe_executed=True)
    with engine.begin() as conn:
        conn.execute(messages.update().values(last_message="x" * 300 + " [bold]not markup"))

    for columns in ("80", "100", "160"):
        out = cli.invoke("list", COLUMNS=columns).stdout
        assert key in out
        assert "parked*" in out
        assert "may have executed" in out
        assert "not markup" not in out  # clipped
        assert all(len(line) <= int(columns) for line in out.splitlines())
    assert "no rows match" in cli.invoke("list", "--state", "expired").stdout


def test_show_gives_the_row_with_payload_and_its_history(cli: Cli, engine: Engine) -> None:
    key = cli.enqueue("--reference", "order-9")
    park(engine, key, maybe_executed=False)
    cli.invoke("requeue", key, "--reason", "answered the compliance question", SUDO_USER="ops")

    shown = cli.json("show", key)

    assert set(shown) == {"row", "history", "payload_diff"}
    assert shown["row"].keys() >= ROW_FIELDS
    assert shown["row"]["payload"] == PAYLOAD
    assert shown["row"]["response"] is None
    assert shown["row"]["reference"] == "order-9"
    (line,) = shown["history"]
    assert (line["kind"], line["actor"].split("@")[0], line["decision"]) == (
        "operator",
        "ops",
        "requeue",
    )
    assert line["message"] == "answered the compliance question"
    assert datetime.fromisoformat(line["at"]).tzinfo is not None

    text = cli.invoke("show", key).stdout
    assert key in text
    assert "answered the compliance question" in text
    assert '"amount": "10.00"' in text


def test_show_of_an_unknown_key_is_one_error_line(cli: Cli) -> None:
    key = str(uuid.uuid4())

    result = cli.invoke("show", key, code=1)

    assert result.stderr.startswith(f"error: no outbox row has idempotency_key {key}")
    assert result.stderr.count("\n") == 1


# --------------------------------------------------------------------------- operator actions


def test_requeue_refuses_a_row_that_is_not_parked(cli: Cli) -> None:
    key = cli.enqueue()

    result = cli.invoke("requeue", key, "--reason", "try again", code=1)

    assert "not parked" in result.stderr
    assert cli.json("show", key)["history"] == []


def test_requeue_sends_a_parked_row_again(cli: Cli, engine: Engine) -> None:
    key = cli.enqueue()
    park(engine, key, maybe_executed=True)

    result = cli.invoke("requeue", key, "--reason", "limit raised", SUDO_USER="alice")

    assert "now pending" in result.stdout
    row = cli.json("show", key)["row"]
    assert (row["state"], row["park_reason"]) == ("pending", None)
    assert row["maybe_executed"] is True  # sticky: the resend uses the same key
    assert "requeued by alice@" in row["last_message"]


def test_operator_actions_require_a_reason(cli: Cli, engine: Engine) -> None:
    key = cli.enqueue()
    park(engine, key, maybe_executed=False)

    cli.invoke("requeue", key, code=2)
    result = cli.invoke("cancel", key, "--reason", "   ", code=2)

    assert "--reason" in result.stderr
    assert cli.json("show", key)["row"]["state"] == "parked"


def test_cancel_refuses_a_row_that_may_have_executed_unless_forced(
    cli: Cli, engine: Engine
) -> None:
    key = cli.enqueue()
    park(engine, key, maybe_executed=True)

    refused = cli.invoke("cancel", key, "--reason", "duplicate order", code=1)
    assert "maybe_executed" in refused.stderr
    assert "--force" in refused.stderr
    assert cli.json("show", key)["row"]["state"] == "parked"

    why = "checked recrypt.net: never executed"
    cli.invoke("cancel", key, "--reason", why, "--force", SUDO_USER="bob")

    shown = cli.json("show", key)
    assert shown["row"]["state"] == "cancelled"
    (line,) = shown["history"]
    assert line["actor"].startswith("bob@")
    assert (line["message"], line["decision"]) == (why, "cancel_forced")


def test_cancel_records_the_default_actor(cli: Cli) -> None:
    key = cli.enqueue()

    cli.invoke("cancel", key, "--reason", "customer withdrew", SUDO_USER="carol")

    (line,) = cli.json("show", key)["history"]
    assert line["actor"].startswith("carol@")


# --------------------------------------------------------------------------- status


def test_status_json_shape(cli: Cli, engine: Engine, store: Store) -> None:
    cli.enqueue()
    parked = cli.enqueue("--lane", "acc-9")
    park(engine, parked, maybe_executed=True)
    beat(store, "w-live", gate="maintenance")
    beat(store, "w-dead", ago=3600)

    status = cli.json("status")

    assert set(status) == {
        "counts",
        "counts_estimated",
        "oldest_due_age_seconds",
        "parked_by_reason",
        "blocked_lanes",
        "maybe_executed_open",
        "holds",
        "approvals_open",
        "workers",
        "leases_expired",
        "oldest_lease_expired_age_seconds",
    }
    assert (status["leases_expired"], status["oldest_lease_expired_age_seconds"]) == (0, None)
    assert status["counts"]["pending"] == 1
    assert status["counts_estimated"] == []  # exact below 10,000 rows a state
    assert status["counts"]["parked"] == 1
    assert status["counts"]["committed"] == 0
    assert isinstance(status["oldest_due_age_seconds"], float)
    assert status["parked_by_reason"] == {"precondition": 1}
    assert status["blocked_lanes"] == ["acc-9"]
    assert status["maybe_executed_open"] == 1
    workers = {w["worker_id"]: w for w in status["workers"]}
    assert workers["w-live"]["liveness"] == "live"
    assert workers["w-live"]["gate"] == "maintenance"
    assert workers["w-live"]["gate_reason"] == "because maintenance"
    assert workers["w-dead"]["liveness"] == "stale"


def test_status_for_people_flags_stale_and_stopped_workers(cli: Cli, store: Store) -> None:
    beat(store, "w-dead", ago=3600)
    beat(store, "w-gone")
    store.worker_stopped("w-gone", datetime.now(UTC))

    out = cli.invoke("status").stdout

    assert "stale (dead?)" in out
    assert "stopped" in out
    assert "pending 0" in out


def test_status_of_an_empty_outbox(cli: Cli) -> None:
    status = cli.json("status")

    assert status["oldest_due_age_seconds"] is None
    assert status["workers"] == []
    assert set(status["counts"].values()) == {0}


# --------------------------------------------------------------------------- check


def test_check_ok(cli: Cli, store: Store) -> None:
    cli.enqueue("--not-before", "2020-01-01T00:00:00+00:00")
    beat(store, "w1")

    result = cli.invoke("check")

    assert result.stdout.startswith("OK: 0 parked; oldest due row ")
    assert "1 live worker (gate open)" in result.stdout
    assert len(result.stdout.splitlines()) == 1


def test_check_warns_on_a_parked_row_and_a_closed_gate(
    cli: Cli, engine: Engine, store: Store
) -> None:
    park(engine, cli.enqueue(), maybe_executed=False, reason="bad_row")
    beat(store, "w1")

    assert cli.invoke("check", code=1).stdout.startswith("WARNING: 1 parked (bad_row=1);")

    cli.invoke("cancel", cli.json("list")["rows"][0]["idempotency_key"], "--reason", "bad")
    beat(store, "w1", gate="maintenance")
    assert "gate maintenance" in cli.invoke("check", code=1).stdout


def test_check_critical_when_rows_wait_and_no_worker_lives(cli: Cli, store: Store) -> None:
    cli.enqueue()
    beat(store, "w-dead", ago=3600)

    result = cli.invoke("check", code=2)

    assert result.stdout.startswith("CRITICAL: ")
    assert "no live worker" in result.stdout


def test_check_critical_when_the_api_key_is_refused(cli: Cli, store: Store) -> None:
    beat(store, "w1", gate="unauthenticated")

    result = cli.invoke("check", code=2)

    assert result.stdout.startswith("CRITICAL: 0 parked; no due rows; 1 live worker")
    assert "(gate unauthenticated)" in result.stdout


def test_check_critical_on_many_parked_rows_by_config(
    cli: Cli, engine: Engine, store: Store, tmp_path: Path
) -> None:
    config = tmp_path / "outbox.toml"
    config.write_text("[check]\nparked_warning = 1\nparked_critical = 2\n")
    for _ in range(2):
        park(engine, cli.enqueue(), maybe_executed=False)
    beat(store, "w1")

    result = cli.invoke("--config", str(config), "check", code=2)

    assert result.stdout.startswith("CRITICAL: 2 parked (precondition=2)")


# --------------------------------------------------------------------------- db, config, errors


def test_db_current_on_a_migrated_database(cli: Cli) -> None:
    out = cli.invoke("db", "current").stdout

    assert "at head:  yes" in out


def test_db_upgrade_migrates_an_empty_database(
    backend: str, fresh_empty_url: Callable[[str], str]
) -> None:
    cli = Cli(fresh_empty_url(backend))

    refused = cli.invoke("list", code=1)
    assert "outbox db upgrade" in refused.stderr

    upgraded = cli.invoke("db", "upgrade").stdout
    assert "at revision" in upgraded
    assert "at head:  yes" in cli.invoke("db", "current").stdout
    assert cli.json("list") == {
        "rows": [],
        "total": 0,
        "next_cursor": None,
        "total_is_a_lower_bound": False,
    }


def test_a_bad_config_file_names_the_key(sqlite_url: str, tmp_path: Path) -> None:
    config = tmp_path / "outbox.toml"
    config.write_text('[worker]\nbatch_size = "lots"\n')
    cli = Cli(sqlite_url)

    result = cli.invoke("--config", str(config), "status", code=1)
    assert result.stderr.startswith("error: ")
    assert "[worker] batch_size" in result.stderr

    via_env = cli.invoke("check", code=2, OUTBOX_CONFIG=str(config))
    assert via_env.stdout.startswith("CRITICAL: ")
    assert "[worker] batch_size" in via_env.stdout
    assert len(via_env.stdout.splitlines()) == 1


def test_a_missing_config_file_is_one_error(sqlite_url: str, tmp_path: Path) -> None:
    result = Cli(sqlite_url).invoke("--config", str(tmp_path / "nope.toml"), "list", code=1)

    assert "does not exist" in result.stderr


def test_an_unreachable_database_names_it_without_the_password() -> None:
    cli = Cli("postgresql://outbox:pw-very-secret@127.0.0.1:9/outbox")

    for command in (["status"], ["list", "--json"], ["db", "current"]):
        result = cli.invoke(*command, code=1)
        assert result.stderr.startswith("error: database postgresql")
        assert "127.0.0.1:9/outbox" in result.stderr
        assert "pw-very-secret" not in result.stderr

    checked = cli.invoke("check", code=2)
    assert checked.stdout.startswith("CRITICAL: ")
    assert "pw-very-secret" not in checked.stdout


def test_commands_other_than_run_need_no_api_key(cli: Cli) -> None:
    key = cli.enqueue()

    cli.invoke("status", RECRYPT_API_KEY=None)
    cli.invoke("show", key, RECRYPT_API_KEY=None)


@pytest.mark.usefixtures("restore_logging")
def test_run_reports_a_missing_api_key(sqlite_url: str) -> None:
    result = Cli(sqlite_url).invoke("run", code=1, RECRYPT_API_KEY=None)

    assert "RECRYPT_API_KEY" in result.stderr


@pytest.mark.usefixtures("restore_logging")
def test_run_refuses_an_unmigrated_database(
    fresh_empty_url: Callable[[str], str],
) -> None:
    result = Cli(fresh_empty_url("sqlite")).invoke("run", code=1)

    assert "outbox db upgrade" in result.stderr


def test_usage_errors_exit_2(sqlite_url: str) -> None:
    cli = Cli(sqlite_url)

    cli.invoke("enqueue", TRANSFER, code=2)  # --json is required
    cli.invoke("nonsense", code=2)
    cli.invoke("list", "--limit", "0", code=2)


def test_simulator_refuses_a_bad_fault_before_listening() -> None:
    result = Cli("sqlite://").invoke("simulator", "--fault", "BOGUS", code=1)

    assert result.stderr.startswith("error: bad fault spec 'BOGUS'")


def test_the_api_key_never_shows_anywhere(cli: Cli, engine: Engine, store: Store) -> None:
    """``Cli.invoke`` checks every output; this runs each read command once more with a key."""
    key = cli.enqueue("--reference", "r1")
    park(engine, key, maybe_executed=True)
    beat(store, "w1")
    for args in (
        ["status"],
        ["status", "--json"],
        ["list"],
        ["list", "--json"],
        ["show", key],
        ["show", key, "--json"],
        ["db", "current"],
        ["--help"],
    ):
        cli.invoke(*args)
    cli.invoke("check", code=1)
    cli.invoke("cancel", key, "--reason", "x", code=1)
