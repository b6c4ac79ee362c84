from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox.errors import BadRowError
from outbox.payload import check_key, fingerprint, parse_payload


def test_canonical_uuid_is_accepted() -> None:
    key = str(uuid.uuid4())
    assert check_key(key) == key


@pytest.mark.parametrize(
    "bad",
    [
        "6F1C2B44-0C47-4C55-9B65-2F0C7C3A9D10",  # uppercase: refused, never rewritten
        "{6f1c2b44-0c47-4c55-9b65-2f0c7c3a9d10}",  # braced
        "6f1c2b440c474c559b652f0c7c3a9d10",  # no dashes
        "not-a-uuid",
        "",
        None,
        42,
    ],
)
def test_malformed_keys_are_refused_with_a_fix(bad) -> None:
    with pytest.raises(BadRowError) as info:
        check_key(bad)
    assert "idempotency_key" in str(info.value)


def test_fingerprint_ignores_key_order_and_whitespace() -> None:
    assert fingerprint('{"a": 1, "b": "2.00"}') == fingerprint('{"b":"2.00","a":1}')
    assert fingerprint({"a": 1}) == fingerprint('{"a":1}')
    assert fingerprint('{"amount": "10.00"}') != fingerprint('{"amount": "10.01"}')


@given(st.text(max_size=200))
def test_fingerprint_never_raises(text) -> None:
    assert len(fingerprint(text)) == 64


def test_parse_payload_says_what_is_wrong() -> None:
    with pytest.raises(BadRowError, match="not valid JSON"):
        parse_payload("{not json")
    assert parse_payload(b'{"a": 1}') == {"a": 1}


def test_deadlocks_are_transient_other_errors_are_not() -> None:
    import pymysql
    import sqlalchemy as sa

    from outbox.store import _transient

    deadlock = sa.exc.OperationalError("UPDATE", {}, pymysql.err.OperationalError(1213, "Deadlock"))
    gone = sa.exc.OperationalError("UPDATE", {}, pymysql.err.OperationalError(2006, "gone away"))
    assert _transient(deadlock)
    assert not _transient(gone)
    assert not _transient(ValueError("x"))
