"""One row's data never stops another row (issue 9, part A).

Each test puts one row the database accepted but the daemon cannot use next to good rows, and
checks that the bad row is parked ``bad_row`` with a short message quoting none of its data,
while the good rows of the same claim are sent and committed.

- SQLite stores anything a plain-SQL writer hands it: text that is not UTF-8, blobs, and JSON
  escapes of lone UTF-16 surrogates. PostgreSQL and MariaDB refuse those at INSERT.
- Messages built from row data are bounded in the store, so a huge field name cannot make
  MariaDB refuse the whole batch's record (``Data too long``); and a record that the database
  refuses for one row's data records the other rows anyway.
- The lease reaper parks a row whose lease keeps expiring instead of releasing it for ever.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from outbox.database import make_engine
from outbox.filters import RowFilter
from outbox.payload import MESSAGE_LIMIT
from outbox.schema import attempts, messages
from outbox.simulator import TRANSFER
from outbox.store import Committed, HistoryLine, Parked, Store

GOOD = {"fromAccount": "acc-1", "toAccount": "acc-2", "amount": "1.00", "currency": "AUD"}
MARKER = "SECRET-PAYLOAD-7c1d"  # must never reach a message or a log line
INSERT = sa.text(
    "INSERT INTO outbox_messages (idempotency_key, method, payload) VALUES (:k, :m, :p)"
)


def _key() -> str:
    return str(uuid.uuid4())


def _insert(engine: Engine, key: Any, method: Any, payload: Any) -> None:
    with engine.begin() as conn:
        conn.execute(INSERT, {"k": key, "m": method, "p": payload})


@contextmanager
def _unguarded(engine: Engine) -> Iterator[sa.Connection]:
    """SQLite: a connection writing as before migration 0005's INSERT guards (rows from then
    are still in the table), the triggers put back when it is done."""
    with engine.begin() as conn:
        triggers = conn.execute(
            sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
        ).all()
        for name, _sql in triggers:
            conn.execute(sa.text(f'DROP TRIGGER "{name}"'))
        yield conn
        for _name, sql in triggers:
            conn.execute(sa.text(sql))


def _row(engine: Engine, row_id: int) -> sa.Row[Any]:
    """The daemon's columns of one row, read by id (its key may not even be text)."""
    m = messages
    with engine.connect() as conn:
        return conn.execute(
            sa.select(
                m.c.state, m.c.park_reason, m.c.attempts, m.c.last_message, m.c.lease_owner
            ).where(m.c.id == row_id)
        ).one()


def _ids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(messages.c.id).order_by(messages.c.id)).scalars())


def _history_messages(engine: Engine, row_id: int) -> list[str]:
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(attempts.c.message).where(attempts.c.message_id == row_id)
        ).scalars()
        return [m or "" for m in found]


def _assert_parked_quietly(engine: Engine, row_id: int, says: str) -> None:
    row = _row(engine, row_id)
    assert (row.state, row.park_reason, row.attempts, row.lease_owner) == (
        "parked",
        "bad_row",
        0,
        None,
    ), row
    for text in [row.last_message or "", *_history_messages(engine, row_id)]:
        assert says in text, text
        assert MARKER not in text
        assert len(text) <= MESSAGE_LIMIT + 100


# --------------------------------------------------------------------------- SQLite bytes

BAD_UTF8 = (b'{"memo": "' + MARKER.encode() + b'\xff\xfe"}', "payload")
UNDECODABLE = {
    # (SQL for the column's value, parameters, the column named in the message)
    "payload_blob": ("CAST(:bad AS BLOB)", {"bad": BAD_UTF8[0]}, "payload"),
    "payload_text": ("CAST(:bad AS TEXT)", {"bad": BAD_UTF8[0]}, "payload"),
    "method_text": ("CAST(x'2f726563727970ff' AS TEXT)", {}, "method"),
    "method_blob": ("x'2f726563727970ff'", {}, "method"),
    "key_text": ("CAST(x'36663163ff' AS TEXT)", {}, "idempotency_key"),
    "lane_text": ("CAST(x'6c616e65ff' AS TEXT)", {}, "lane"),
}


@pytest.mark.parametrize("backend", ["sqlite"])  # the others refuse such text at INSERT
@pytest.mark.parametrize("case", list(UNDECODABLE))
def test_text_that_is_not_utf8_parks_its_row_and_the_others_are_sent(
    case: str,
    engine: Engine,
    store: Store,
    make_dispatcher: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SQLite: a value the driver cannot decode used to fail every claim of every lane."""
    sql, params, column = UNDECODABLE[case]
    columns = {
        "idempotency_key": f"'{_key()}'",
        "method": f"'{TRANSFER}'",
        "payload": f"'{json.dumps(GOOD)}'",
        "lane": "NULL",
    }
    columns[column] = sql
    first_good = _key()
    _insert(engine, first_good, TRANSFER, json.dumps(GOOD))
    with _unguarded(engine) as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO outbox_messages ({', '.join(columns)}) "
                f"VALUES ({', '.join(columns.values())})"
            ),
            params,
        )
    last_good = _key()
    _insert(engine, last_good, TRANSFER, json.dumps(GOOD))
    with caplog.at_level(logging.DEBUG):
        report = make_dispatcher().run_once()
    assert report.claimed == 3
    _first, bad_id, _last = _ids(engine)
    _assert_parked_quietly(engine, bad_id, f"{column} is not valid UTF-8")
    assert store.get(first_good).state == "committed"
    assert store.get(last_good).state == "committed"
    assert MARKER not in caplog.text
    # and the operator's views read the row without failing or quoting its bytes
    status = store.status(datetime.now(UTC))
    assert status.counts["parked"] == 1
    (shown,) = [r for r in store.list_rows(RowFilter(state="parked")).rows]
    assert MARKER not in repr(shown) and MARKER not in repr(status)
    if column != "idempotency_key":
        assert MARKER not in repr(store.get(shown.idempotency_key))


SURROGATES = {
    "in_a_value": '{"memo": "cut inside an emoji \\ud83d", "fromAccount": "acc-1"}',
    "in_a_field_name": '{"memo\\udc00": "x", "fromAccount": "acc-1"}',
    "low_half_alone": '{"memo": "\\ude00 and more", "fromAccount": "acc-1"}',
}


@pytest.mark.parametrize("case", list(SURROGATES))
def test_a_lone_surrogate_parks_its_row_or_is_refused_at_insert(
    case: str, engine: Engine, backend: str, store: Store, make_dispatcher: Callable[..., Any]
) -> None:
    """JSON.stringify of a string cut inside an emoji: valid JSON text, no valid UTF-8 string.

    It used to raise in the claim's fingerprint (SQLite), so no row of any lane was sent.
    """
    bad = _key()
    payload = SURROGATES[case].replace('"fromAccount"', '"toAccount": "acc-2", "fromAccount"')
    if backend != "sqlite":  # jsonb and MariaDB's JSON_VALID refuse it at the writer
        with pytest.raises(sa.exc.DBAPIError):
            _insert(engine, bad, TRANSFER, payload)
        return
    with _unguarded(engine) as conn:  # (SQLite's json_valid takes it anyway)
        conn.execute(INSERT, {"k": bad, "m": TRANSFER, "p": payload})
    good = _key()
    _insert(engine, good, TRANSFER, json.dumps(GOOD))
    report = make_dispatcher().run_once()
    assert report.claimed == 2
    row = store.get(bad)
    assert (row.state, row.park_reason, row.attempts) == ("parked", "bad_row", 0)
    assert "surrogate" in (row.last_message or "")
    assert store.get(good).state == "committed"


# --------------------------------------------------------------------------- bounded messages


def test_a_huge_unknown_field_name_is_parked_and_the_batch_commits(
    engine: Engine, store: Store, make_dispatcher: Callable[..., Any], sim: Any
) -> None:
    """MariaDB: the park message quoted a 70 kB name, overflowed TEXT, and the batch's one
    record transaction failed: the good rows, already executed at Recrypt, never committed.
    """
    bad = _key()
    _insert(engine, bad, TRANSFER, json.dumps(GOOD | {"n" * 70_000: 1}))
    good = [_key() for _ in range(3)]
    for key in good:
        _insert(engine, key, TRANSFER, json.dumps(GOOD))
    report = make_dispatcher().run_once()
    assert report.claimed == 4
    row = store.get(bad)
    assert (row.state, row.park_reason, row.attempts) == ("parked", "bad_row", 0)
    assert "no field named" in (row.last_message or "")
    assert len(row.last_message or "") <= 1000  # quotes a short prefix of the name
    assert [store.get(key).state for key in good] == ["committed"] * 3
    assert sim.executed_keys() == set(good)


def test_every_stored_message_is_bounded(engine: Engine, store: Store, clock: Any) -> None:
    """Operators' reasons and actors, Recrypt's messages: all cut in the store, in one place."""
    huge = "r" * 100_000
    key = _key()
    _insert(engine, key, TRANSFER, json.dumps(GOOD))
    [claim] = store.claim_due("w1", 10, 30.0, clock())
    park = Parked(claim, HistoryLine("call", "park", "FAILED_PRECONDITION", huge), "precondition")
    assert store.record([park], clock()) == []
    store.requeue(key, "a" * 1000, huge, clock())
    view = store.get(key)
    assert len(view.last_message or "") <= MESSAGE_LIMIT
    assert (view.last_message or "").endswith("characters cut)")
    lines = store.history(key)
    assert [len(line.message or "") <= MESSAGE_LIMIT for line in lines] == [True, True]
    assert all(len(line.actor or "") <= 255 for line in lines)


# --------------------------------------------------------------------------- record


REFUSED: dict[str, tuple[set[str], Callable[[Any], Any]]] = {
    # (the databases that refuse it, the outcome for a claim); SQLite stores any value.
    "nul_in_response": (  # jsonb cannot hold NUL, which a protobuf string may
        {"postgresql"},
        lambda claim: Committed(
            claim, HistoryLine("call", "commit", "OK", "ok"), {"memo": "a\x00b"}
        ),
    ),
    "code_too_long": (  # VARCHAR(32)
        {"postgresql", "mariadb"},
        lambda claim: Committed(claim, HistoryLine("call", "commit", "C" * 40, "ok")),
    ),
    "reason_too_long": (
        {"postgresql", "mariadb"},
        lambda claim: Parked(claim, HistoryLine("call", "park", "X", "x"), "r" * 40),
    ),
}


@pytest.mark.parametrize("refusal", list(REFUSED))
def test_one_refused_outcome_does_not_lose_the_others(
    refusal: str, engine: Engine, backend: str, store: Store, clock: Any
) -> None:
    """The whole batch's record used to fail: outcomes of calls that executed, lost."""
    refusing, make = REFUSED[refusal]
    keys = [_key() for _ in range(3)]
    for key in keys:
        _insert(engine, key, TRANSFER, json.dumps(GOOD))
    first, middle, last = store.claim_due("w1", 10, 30.0, clock())
    refused = make(middle)
    ok = HistoryLine("call", "commit", "OK", "committed")
    lost = store.record([Committed(first, ok), refused, Committed(last, ok)], clock())
    assert lost == []
    assert store.get(keys[0]).state == store.get(keys[2]).state == "committed"
    row = store.get(keys[1])
    if backend not in refusing:  # this database stores the value: recorded as it was
        assert row.state == ("committed" if isinstance(refused, Committed) else "parked")
        return
    executed = isinstance(refused, Committed)
    assert (row.state, row.park_reason, row.maybe_executed) == ("parked", "bad_row", executed)
    assert "the database refused to store" in (row.last_message or "")
    assert store.record([Committed(middle, ok)], clock()) == [Committed(middle, ok)]  # recorded


def test_record_raises_when_the_database_cannot_be_reached(
    engine: Engine, backend: str, store: Store, clock: Any, tmp_path: Any
) -> None:
    """A connection-level failure is not a row's fault: the dispatcher keeps the outcomes."""
    _insert(engine, _key(), TRANSFER, json.dumps(GOOD))
    [claim] = store.claim_due("w1", 10, 30.0, clock())
    nowhere = {
        "sqlite": f"sqlite:///{tmp_path}/no/such/dir/outbox.db",
        "postgresql": "postgresql://postgres@127.0.0.1:1/outbox",
        "mariadb": "mysql://root@127.0.0.1:1/outbox",
    }[backend]
    unreachable = Store(make_engine(nowhere))
    with pytest.raises(sa.exc.OperationalError):
        unreachable.record([Committed(claim, HistoryLine("call", "commit", "OK"))], clock())
    assert store.get(claim.idempotency_key).state == "inflight"


# --------------------------------------------------------------------------- the reaper


def test_a_row_whose_lease_keeps_expiring_is_parked(
    engine: Engine, store: Store, clock: Any
) -> None:
    """A row whose call hangs every time used to go back to pending for ever."""
    key = _key()
    _insert(engine, key, TRANSFER, json.dumps(GOOD))
    for release in range(1, 4):
        [_claim] = store.claim_due("w1", 10, 30.0, clock())
        clock.advance(31)
        released = store.release_expired_leases(clock(), max_unknown_attempts=3)
        assert released == ([key] if release < 3 else []), release
        assert store.get(key).state == ("pending" if release < 3 else "parked")
    row = store.get(key)
    assert (row.park_reason, row.maybe_executed, row.attempts) == ("unknown_outcome", True, 3)
    assert "check on recrypt.net" in (row.last_message or "")
    assert [line.decision for line in store.history(key)] == ["lease_expired"] * 2 + ["park"]
    assert store.claim_due("w1", 10, 30.0, clock()) == []


@pytest.mark.parametrize("backend", ["sqlite"])  # the others refuse such values at INSERT
@pytest.mark.parametrize(
    "column, sql",
    [("traceparent", "CAST(x'30302dff' AS TEXT)"), ("created_at", "'not a time'")],
)
def test_a_hint_that_cannot_be_read_never_stops_its_row(
    column: str, sql: str, engine: Engine, store: Store, make_dispatcher: Callable[..., Any]
) -> None:
    """The trace context and the insertion time only feed tracing and the latency metrics:
    unreadable, they are skipped, and the row is sent like any other (issue 15)."""
    key = _key()
    with _unguarded(engine) as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO outbox_messages (idempotency_key, method, payload, {column}) "
                f"VALUES (:k, :m, :p, {sql})"
            ),
            {"k": key, "m": TRANSFER, "p": json.dumps(GOOD)},
        )
    assert make_dispatcher().run_once().claimed == 1
    assert store.get(key).state == "committed"
