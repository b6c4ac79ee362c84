"""What each database does with the timestamps and payloads plain-SQL writers write.

Issue 9, finding 2: SQLite compares timestamps as text, so a writer's ``2026-11-23T08:00:00``
(or ``…Z``, ``…+02:00``) sorted after every time of its day and an epoch number before every
time. Migration 0005 gives SQLite's writer columns the protection the servers' types give:
triggers refuse what SQLite cannot compare and rewrite every accepted ISO-8601 form to the
text the app writes. PostgreSQL and MariaDB are pinned here too, form by form, as the README's
plain-SQL section documents them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

import outbox
from outbox import migrate
from outbox.cli import main
from outbox.database import make_engine
from outbox.schema import messages
from outbox.simulator import TRANSFER
from outbox.store import Store

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
EIGHT = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
PAYLOAD = '{"fromAccount": "acme", "toAccount": "b", "amount": "1.00", "currency": "AUD"}'
BODY = {"fromAccount": "acme", "toAccount": "b", "amount": "1.00", "currency": "AUD"}


def insert(conn: sa.Connection, **columns: Any) -> str:
    """A plain-SQL writer's INSERT with the given writer columns."""
    values = {"idempotency_key": str(uuid.uuid4()), "method": TRANSFER, "payload": PAYLOAD}
    values |= columns
    names = ", ".join(values)
    params = ", ".join(f":{name}" for name in values)
    conn.execute(sa.text(f"INSERT INTO outbox_messages ({names}) VALUES ({params})"), values)
    return str(values["idempotency_key"])


def stored_text(engine: Engine, key: str, column: str) -> Any:
    """The value exactly as the database holds it (no type processing)."""
    with engine.connect() as conn:
        return conn.exec_driver_sql(
            f"SELECT {column} FROM outbox_messages WHERE idempotency_key = ?", (key,)
        ).scalar_one()


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


# --------------------------------------------------------------------------- SQLite

#: Every accepted form of 08:00:00 UTC on 2026-11-23, and the fraction each keeps.
SQLITE_ACCEPTED = {
    "space": ("2026-11-23 08:00:00", "000000"),
    "T": ("2026-11-23T08:00:00", "000000"),
    "Z": ("2026-11-23T08:00:00Z", "000000"),
    "space-Z": ("2026-11-23 08:00:00Z", "000000"),
    "offset": ("2026-11-23T10:00:00+02:00", "000000"),
    "negative-offset": ("2026-11-23T03:30:00-04:30", "000000"),
    "day-before": ("2026-11-22T23:00:00-09:00", "000000"),
    "fraction": ("2026-11-23 08:00:00.5", "500000"),
    "micro-offset": ("2026-11-23T10:00:00.123456+02:00", "123456"),
    "nano": ("2026-11-23T08:00:00.123456789Z", "123456"),
    "canonical": ("2026-11-23 08:00:00.000000", "000000"),
}


@pytest.mark.parametrize("form", list(SQLITE_ACCEPTED))
def test_sqlite_stores_each_iso_form_as_the_apps_utc_text(form: str, sqlite_engine: Engine) -> None:
    written, fraction = SQLITE_ACCEPTED[form]
    with sqlite_engine.begin() as conn:
        key = insert(conn, not_before=written, expires_at=written)
        app_key = outbox.enqueue(
            conn, TRANSFER, BODY, expires_at=EIGHT + timedelta(microseconds=int(fraction))
        )
    app_text = stored_text(sqlite_engine, app_key, "expires_at")
    assert app_text == f"2026-11-23 08:00:00.{fraction}"
    assert stored_text(sqlite_engine, key, "expires_at") == app_text
    assert stored_text(sqlite_engine, key, "not_before") == app_text


def test_sqlite_an_update_is_normalised_too(sqlite_engine: Engine) -> None:
    with sqlite_engine.begin() as conn:
        key = insert(conn)
        conn.execute(sa.text("UPDATE outbox_messages SET expires_at = '2026-11-23T09:30:00+01:30'"))
    assert stored_text(sqlite_engine, key, "expires_at") == "2026-11-23 08:00:00.000000"


def test_sqlite_a_T_expires_at_expires_on_time(sqlite_engine: Engine) -> None:
    """Seen on 371d9f8: ``expires_at = '2026-11-23T08:00:00'`` was still sent at 09:00."""
    with sqlite_engine.begin() as conn:
        for written in ("2026-11-23T08:00:00", "2026-11-23T08:00:00Z", "2026-11-23T10:00:00+02:00"):
            insert(conn, expires_at=written)
    store = Store(sqlite_engine)
    assert store.claim_due("w1", 10, 30, NOW) == []
    assert store.expire_due(NOW) == (3, 0)


def test_sqlite_a_past_T_not_before_is_due(sqlite_engine: Engine) -> None:
    """Seen on 371d9f8: a past ``not_before`` with a ``T`` waited until midnight."""
    with sqlite_engine.begin() as conn:
        keys = {insert(conn, not_before=w) for w in ("2026-11-23T08:00:00", "2026-11-23T08:00:00Z")}
        waits = insert(conn, not_before="2026-11-23T12:00:00+02:00")  # 10:00 UTC
    claimed = {c.idempotency_key for c in Store(sqlite_engine).claim_due("w1", 10, 30, NOW)}
    assert claimed == keys
    assert waits not in claimed


SQLITE_REFUSED = {
    "epoch-integer": 1795420800,
    "epoch-real": 1795420800.5,
    "epoch-text": "1795420800",
    "julian-day": 2461367.5,
    "compact-number": 20261123080000,
    "zero-date": "0000-00-00 00:00:00",
    "date-only": "2026-11-23",
    "no-seconds": "2026-11-23 08:00",
    "other-order": "23/11/2026 08:00:00",
    "not-a-day": "2026-02-31 08:00:00",
    "hour-25": "2026-11-23 25:00:00",
    "short-offset": "2026-11-23T08:00:00+2:00",
    "hour-offset": "2026-11-23 08:00:00+00",
    "space-before-offset": "2026-11-23 08:00:00 +02:00",
    "lowercase-z": "2026-11-23T08:00:00z",
    "trailing-junk": "2026-11-23 08:00:00.5abc",
    "word": "tomorrow",
    "blob": b"2026-11-23 08:00:00",
}


@pytest.mark.parametrize("column", ["not_before", "expires_at"])
@pytest.mark.parametrize("form", list(SQLITE_REFUSED))
def test_sqlite_refuses_what_it_cannot_compare(
    form: str, column: str, sqlite_engine: Engine
) -> None:
    """Numbers, epochs and other text: refused at INSERT and UPDATE, naming the column."""
    value = SQLITE_REFUSED[form]
    says = rf"{column}: .*YYYY-MM-DD HH:MM:SS"
    with pytest.raises(sa.exc.IntegrityError, match=says), sqlite_engine.begin() as conn:
        insert(conn, **{column: value})
    with sqlite_engine.begin() as conn:
        key = insert(conn)
    with pytest.raises(sa.exc.IntegrityError, match=says), sqlite_engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE outbox_messages SET {column} = :v"), {"v": value})
    assert stored_text(sqlite_engine, key, column) is None


@pytest.mark.parametrize("payload", ["{not json", "", b'{"a": 1}', "[" * 5000 + "]" * 5000])
def test_sqlite_refuses_a_payload_that_is_not_json_text(
    payload: Any, sqlite_engine: Engine
) -> None:
    with pytest.raises(sa.exc.IntegrityError, match=r"payload: .*JSON"), sqlite_engine.begin() as c:
        insert(c, payload=payload)
    with sqlite_engine.begin() as conn:
        insert(conn)
    with pytest.raises(sa.exc.IntegrityError, match=r"payload: .*JSON"), sqlite_engine.begin() as c:
        c.execute(sa.text("UPDATE outbox_messages SET payload = :p"), {"p": payload})


def test_sqlite_the_daemons_own_updates_pass_the_guards(sqlite_engine: Engine) -> None:
    """requeue clears ``expires_at``; NULL is always accepted."""
    with sqlite_engine.begin() as conn:
        insert(conn, expires_at="2026-11-23T10:00:00Z")
        conn.execute(sa.text("UPDATE outbox_messages SET expires_at = NULL, state = 'parked'"))
    with sqlite_engine.connect() as conn:
        assert conn.execute(sa.select(messages.c.expires_at)).scalar_one() is None


# --------------------------------------------------------------------------- the migration

PRE_0005_ROWS = [
    # (state, not_before as written, expires_at as written)
    ("pending", "2026-11-23T08:00:00", "2026-11-24T10:00:00+02:00"),
    ("pending", 1795420800, None),
    ("inflight", None, "garbage"),
    ("committed", "2026-11-23 08:00:00", 1795420800.5),
    ("parked", "2026-11-23T08:00:00.25Z", None),
]


def test_migration_0005_normalises_old_rows_and_parks_unreadable_ones(
    fresh_empty_url: Any,
) -> None:
    """Old rows: accepted forms rewritten; the rest cleared, open rows parked ``bad_row``."""
    engine = make_engine(fresh_empty_url("sqlite"))
    try:
        migrate.upgrade(engine, "0004")
        with engine.begin() as conn:
            keys = [
                insert(conn, state=state, not_before=nb, expires_at=ex, lease_owner="old")
                for state, nb, ex in PRE_0005_ROWS
            ]
        migrate.upgrade(engine)
        check_migrated_rows(engine, keys)
    finally:
        engine.dispose()


def check_migrated_rows(engine: Engine, keys: list[str]) -> None:
    store = Store(engine)
    rows = {key: store.get(key) for key in keys}  # every row is readable
    fine, epoch, garbage, finished, parked = (rows[k] for k in keys)
    assert stored_text(engine, keys[0], "not_before") == "2026-11-23 08:00:00.000000"
    assert stored_text(engine, keys[0], "expires_at") == "2026-11-24 08:00:00.000000"
    assert (fine.state, fine.not_before) == ("pending", EIGHT)
    assert (epoch.state, epoch.park_reason, epoch.not_before) == ("parked", "bad_row", None)
    assert "not_before" in (epoch.last_message or "") and "1795420800" in epoch.last_message
    assert (garbage.state, garbage.park_reason, garbage.expires_at) == ("parked", "bad_row", None)
    assert "expires_at" in (garbage.last_message or "")
    assert garbage.maybe_executed and garbage.lease_owner is None  # it was in flight
    assert (finished.state, finished.expires_at) == ("committed", None)
    assert "expires_at" in (finished.last_message or "")
    assert parked.not_before == EIGHT + timedelta(milliseconds=250)
    assert [(h.kind, h.decision) for h in store.history(keys[1])] == [("system", "parked")]


# --------------------------------------------------------------------------- every database


def test_outbox_show_never_crashes_on_a_stored_value(sqlite_engine: Engine) -> None:
    """A value written around the guards (here: with them dropped) is shown as stored."""
    with sqlite_engine.begin() as conn:
        for name in ("outbox_messages_guard_insert", "outbox_messages_guard_update"):
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
        key = insert(conn, not_before=1795420800, expires_at="soon", state="parked")
    store = Store(sqlite_engine)
    row = store.get(key)
    assert (row.not_before, row.expires_at) == ("1795420800", "soon")
    assert [r.idempotency_key for r in store.list_rows().rows] == [key]
    shown = run_cli(str(sqlite_engine.url), "show", key, "--json")
    assert json.loads(shown)["row"]["not_before"] == "1795420800"
    assert "1795420800" in run_cli(str(sqlite_engine.url), "show", key)
    run_cli(str(sqlite_engine.url), "status")


def run_cli(url: str, *args: str) -> str:
    """``outbox …`` in process; it must not fail."""
    env = {"OUTBOX_DATABASE_URL": url, "RECRYPT_API_KEY": "k", "OUTBOX_CONFIG": None}
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.stdout


# PostgreSQL: timestamptz. A value without a zone is read in the writer's session TimeZone.
POSTGRES_FORMS = {
    "naive": ("2026-11-23 09:00:00", EIGHT),  # session Europe/Berlin: UTC+1 in November
    "T": ("2026-11-23T09:00:00", EIGHT),
    "Z": ("2026-11-23T08:00:00Z", EIGHT),
    "utc-offset": ("2026-11-23 08:00:00+00", EIGHT),
    "offset": ("2026-11-23T10:00:00+02:00", EIGHT),
    "fraction": ("2026-11-23 08:00:00.5Z", EIGHT + timedelta(milliseconds=500)),
    "date-only": ("2026-11-23", datetime(2026, 11, 22, 23, 0, tzinfo=UTC)),
    "no-seconds": ("2026-11-23 09:00", EIGHT),
    "epoch-text": ("1795420800", None),
    "not-a-day": ("2026-02-31 08:00:00Z", None),
    "hour-25": ("2026-11-23 25:00:00Z", None),
    "zero-date": ("0000-00-00 00:00:00", None),
}


@pytest.mark.parametrize("form", list(POSTGRES_FORMS))
def test_postgresql_reads_each_form(form: str, postgres_url: str) -> None:
    written, read = POSTGRES_FORMS[form]
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET TIME ZONE 'Europe/Berlin'")
            if read is None:
                with pytest.raises(sa.exc.DataError):
                    insert(conn, expires_at=written)
                return
            key = insert(conn, expires_at=written)
            conn.commit()
        assert Store(engine).get(key).expires_at == read
    finally:
        engine.dispose()


@pytest.mark.parametrize("number", [1795420800, 20261123080000], ids=["epoch", "compact"])
def test_postgresql_refuses_a_number(number: int, postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        with pytest.raises(sa.exc.ProgrammingError, match="timestamp"), engine.begin() as conn:
            insert(conn, expires_at=number)
    finally:
        engine.dispose()


# MariaDB: DATETIME(6) holds no zone; the daemon reads it as UTC, whatever the writer's
# session time_zone. Strict mode (the default sql_mode) refuses zones and epochs.
MARIADB_FORMS = {
    "naive": ("2026-11-23 08:00:00", EIGHT),
    "T": ("2026-11-23T08:00:00", EIGHT),
    "fraction": ("2026-11-23 08:00:00.5", EIGHT + timedelta(milliseconds=500)),
    "compact-number": (20261123080000, EIGHT),
    "date-only": ("2026-11-23", EIGHT - timedelta(hours=8)),
    "no-seconds": ("2026-11-23 08:00", EIGHT),
    "Z": ("2026-11-23T08:00:00Z", None),
    "offset": ("2026-11-23T10:00:00+02:00", None),
    "hour-offset": ("2026-11-23 08:00:00+00", None),
    "epoch": (1795420800, None),
    "epoch-text": ("1795420800", None),
    "not-a-day": ("2026-02-31 08:00:00", None),
    "hour-25": ("2026-11-23 25:00:00", None),
}


@pytest.mark.parametrize("form", list(MARIADB_FORMS))
def test_mariadb_reads_each_form(form: str, mariadb_url: str) -> None:
    written, read = MARIADB_FORMS[form]
    engine = make_engine(mariadb_url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET time_zone = '+05:00'")  # no effect on DATETIME
            if read is None:
                with pytest.raises(sa.exc.DBAPIError, match=r"1292, .Incorrect datetime value"):
                    insert(conn, expires_at=written)
                return
            key = insert(conn, expires_at=written)
            conn.commit()
        assert Store(engine).get(key).expires_at == read
    finally:
        engine.dispose()


def test_mariadb_non_strict_mode_drops_an_offset_silently(mariadb_url: str) -> None:
    """Why the README says to keep strict mode: 10:00+02:00 is stored as 10:00 UTC."""
    engine = make_engine(mariadb_url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET SESSION sql_mode = ''")
            key = insert(conn, expires_at="2026-11-23T10:00:00+02:00")
            conn.commit()
        assert Store(engine).get(key).expires_at == EIGHT + timedelta(hours=2)
    finally:
        engine.dispose()


def test_mariadb_a_zero_date_is_due_at_once_expires_at_once_and_shows(mariadb_url: str) -> None:
    """Strict mode still takes ``0000-00-00``; it sorts first; the driver hands it back as text."""
    engine = make_engine(mariadb_url)
    try:
        with engine.begin() as conn:
            due = insert(conn, not_before="0000-00-00 00:00:00")
            expired = insert(conn, expires_at="0000-00-00 00:00:00")
        store = Store(engine)
        assert store.expire_due(NOW) == (1, 0)
        assert [c.idempotency_key for c in store.claim_due("w1", 10, 30, NOW)] == [due]
        assert store.get(expired).state == "expired"
        assert store.get(due).not_before == "0000-00-00 00:00:00.000000"
        url = engine.url.render_as_string(hide_password=False)
        assert "0000-00-00" in run_cli(url, "show", due)
    finally:
        engine.dispose()
