"""The shipped roles (``outbox db roles --print``) on PostgreSQL and MariaDB: the daemon, a
writer and the CLI each run under their own role, and each role is refused what it must not do.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import outbox
from outbox.cli import main
from outbox.database import make_engine
from outbox.simulator import TRANSFER, Fault, Simulator
from tests.e2e.roles import ROLE_BACKENDS, RoledDatabase, make_roled_database
from tests.e2e.test_process import start_daemon, wait_until, write_config

pytestmark = pytest.mark.slow
BODY = {"fromAccount": "a", "toAccount": "b", "amount": "1.00"}


@pytest.fixture(params=ROLE_BACKENDS)
def roled(request: pytest.FixtureRequest) -> Iterator[RoledDatabase]:
    cleanups: list[object] = []
    try:
        yield make_roled_database(str(request.param), cleanups)
    finally:
        for cleanup in reversed(cleanups):
            cleanup()  # type: ignore[operator]


def enqueue_as(url: str, count: int, **options: object) -> list[str]:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            return [outbox.enqueue(conn, TRANSFER, BODY, **options) for _ in range(count)]  # type: ignore[arg-type]
    finally:
        engine.dispose()


def outbox_cli(url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env={"OUTBOX_DATABASE_URL": url})
    return result.exit_code, result.output


def count_rows(url: str, table: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


#: Refused for want of a privilege: PostgreSQL's SQLSTATE (also "must be owner"), MariaDB's
#: 1142 (command denied for a table) and 1044 (access denied to the database: CREATE TABLE).
DENIED = {"42501", 1142, 1044}


def refused(url: str, statement: str) -> bool:
    """Whether the database refuses ``statement`` for want of a privilege (else it fails)."""
    engine = make_engine(url)
    try:
        with pytest.raises(sa.exc.DBAPIError) as caught, engine.begin() as conn:
            conn.execute(sa.text(statement))
        orig = caught.value.orig
        mariadb = orig is not None and bool(orig.args) and isinstance(orig.args[0], int)
        code = orig.args[0] if mariadb else getattr(orig, "sqlstate", None)
        assert code in DENIED, f"{statement}: refused, but not for a privilege: {orig}"
        return True
    finally:
        engine.dispose()


def retention_config(tmp_path: Path, url: str, target: str) -> Path:
    """The e2e config, purging finished rows and their tombstones within seconds."""
    config = write_config(tmp_path, url, target, lease=10.0)
    fast = "[retention]\ndays = 0.00001\ntombstone_days = 0.00001\ninterval = 0.2\n"
    config.write_text(config.read_text() + fast)
    return config


def test_daemon_writer_and_cli_work_under_their_roles(
    roled: RoledDatabase, sim: Simulator, tmp_path: Path
) -> None:
    writer, reader = roled.url("writer"), roled.url("reader")
    sent = enqueue_as(writer, 3) + enqueue_as(writer, 2, lane="acct-1")
    [bad] = enqueue_as(writer, 1)
    sim.inject(Fault(grpc.StatusCode.INVALID_ARGUMENT, "no such account", keys=frozenset([bad])))
    config = retention_config(tmp_path, roled.url("daemon"), sim.target)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, log)
    try:
        assert sim.wait_for(lambda s: s.executed_keys() >= set(sent), timeout=60), log.read_text()
        # committed, purged (messages, attempts, tombstones written and deleted) by the daemon
        assert wait_until(lambda: count_rows(reader, "outbox_messages") == 1, 30), log.read_text()
        assert wait_until(lambda: count_rows(reader, "outbox_tombstones") == 0, 30), log.read_text()
        code, out = outbox_cli(reader, "list", "--state", "parked")
        assert code == 0 and bad in out, out
        for command in (["status"], ["show", bad], ["db", "current"]):
            code, out = outbox_cli(reader, *command)
            assert code == 0, (command, out)
        code, out = outbox_cli(reader, "check")
        assert out.startswith("WARNING: 1 parked"), out  # read fine; a parked row warns
        code, out = outbox_cli(reader, "requeue", bad, "--reason", "fixed the account")
        # the reader only reads (MariaDB's 1142 "command denied" text is elided as quoted)
        assert code == 1 and ("denied" in out or "(1142," in out), out
        sim.clear_faults()
        code, out = outbox_cli(roled.url("operator"), "requeue", bad, "--reason", "fixed")
        assert code == 0, out
        assert sim.wait_for(lambda s: bad in s.executed_keys(), timeout=30), log.read_text()
    finally:
        daemon.send_signal(signal.SIGTERM)
        stopped = daemon.wait(timeout=30)
    text = log.read_text()
    assert stopped == 0, text
    assert "denied" not in text.lower() and "error" not in text.lower(), text


def test_operator_cancels_and_cli_enqueue_runs_as_the_writer(roled: RoledDatabase) -> None:
    code, key = outbox_cli(
        roled.url("writer"),
        "enqueue",
        TRANSFER,
        "--json",
        '{"fromAccount": "a", "toAccount": "b", "amount": "2.50"}',
        "--not-before",
        "2099-01-01T00:00:00Z",
    )
    assert code == 0, key
    code, out = outbox_cli(roled.url("operator"), "cancel", key.strip(), "--reason", "typo")
    assert code == 0 and "now cancelled" in out, out


def test_writer_cannot_update_or_delete_a_row(roled: RoledDatabase) -> None:
    writer = roled.url("writer")
    [key] = enqueue_as(writer, 1)
    where = f"WHERE idempotency_key = '{key}'"
    for statement in (
        f"UPDATE outbox_messages SET state = 'cancelled' {where}",
        f"UPDATE outbox_messages SET payload = '{{}}' {where}",
        f"DELETE FROM outbox_messages {where}",
        "DELETE FROM outbox_tombstones",
        "INSERT INTO outbox_attempts (message_id, at, kind) VALUES (1, CURRENT_TIMESTAMP, 'x')",
        "UPDATE alembic_version SET version_num = 'x'",
    ):
        assert refused(writer, statement)
    assert count_rows(roled.url("reader"), "outbox_messages") == 1


def test_daemon_and_cli_roles_cannot_alter_the_schema(roled: RoledDatabase) -> None:
    for role in ("daemon", "writer", "reader", "operator"):
        url = roled.url(role)
        for statement in (
            "CREATE TABLE outbox_extra (id INTEGER PRIMARY KEY)",
            "ALTER TABLE outbox_messages ADD COLUMN extra INTEGER",
            "DROP TABLE outbox_lanes",
            "CREATE INDEX ix_extra ON outbox_messages (method)",
            "UPDATE alembic_version SET version_num = '0001'",
            "INSERT INTO outbox_messages (idempotency_key, method, payload) VALUES ('k', 'm', '{}')"
            if role != "writer"
            else "TRUNCATE outbox_messages",
        ):
            assert refused(url, statement), role
