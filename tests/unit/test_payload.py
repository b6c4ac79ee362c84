from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox.errors import BadRowError
from outbox.payload import (
    BRIEF_LIMIT,
    MESSAGE_LIMIT,
    QUOTE_LIMIT,
    bounded,
    brief,
    check_key,
    check_text,
    fingerprint,
    parse_payload,
    read_text,
)

TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"


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
    t = TRANSFER
    assert fingerprint(t, '{"a": 1, "b": "2.00"}') == fingerprint(t, '{"b":"2.00","a":1}')
    assert fingerprint(t, {"a": 1}) == fingerprint(t, '{"a":1}')
    assert fingerprint(t, b'{"a": 1}') == fingerprint(t, '{"a":1}')
    assert fingerprint(t, '{"amount": "10.00"}') != fingerprint(t, '{"amount": "10.01"}')


def test_fingerprint_binds_the_method_too() -> None:
    payload = '{"account": "acc-1"}'
    cancel = fingerprint("/recrypt.market.v1.Market/CancelOrder", payload)
    assert cancel != fingerprint("/recrypt.market.v1.Market/PlaceOrder", payload)
    # the separator keeps method and payload apart (canonical JSON has no raw newline)
    assert fingerprint("/a", '"b"') != fingerprint('/a"', "b")


@given(
    st.one_of(st.text(max_size=50), st.binary(max_size=50), st.none(), st.integers()),
    st.one_of(st.text(max_size=200), st.binary(max_size=200), st.none(), st.integers()),
)
def test_fingerprint_never_raises(method, payload) -> None:
    assert len(fingerprint(method, payload)) == 64


@pytest.mark.parametrize(
    "payload",
    [
        '{"memo": "\\ud83d"}',  # JSON.stringify of a string cut inside an emoji
        '{"memo\\udc00": 1}',
        "\ud800 not json",
        b'{"memo": "\xff\xfe"}',  # not UTF-8
        "[" * 5000 + "]" * 5000,  # deeper than Python's recursion limit
    ],
)
def test_fingerprint_of_odd_rows_is_stable_and_distinct(payload) -> None:
    assert fingerprint(TRANSFER, payload) == fingerprint(TRANSFER, payload)
    assert fingerprint(TRANSFER, payload) != fingerprint(TRANSFER, "{}")


def test_a_lone_surrogate_is_refused_with_a_reason() -> None:
    check_text({"memo": "\U0001f600 a whole emoji"})
    for bad in ({"memo": "cut \ud83d"}, {"m\udc00": 1}, ["\ude00"]):
        with pytest.raises(BadRowError, match="lone UTF-16 surrogate"):
            check_text(bad)


def test_read_text_decodes_or_names_the_defect_without_quoting() -> None:
    assert read_text("text", "method") == ("text", None)
    assert read_text(b"/a.v1.S/M", "method") == ("/a.v1.S/M", None)
    assert read_text(None, "lane") == (None, None)
    placeholder, defect = read_text(b"SECRET\xff", "payload")
    assert "SECRET" not in placeholder
    assert defect is not None
    assert defect.startswith("payload is not valid UTF-8 text (byte 0xff at offset 6 of 7)")
    assert "SECRET" not in defect


def test_bounded_cuts_with_a_marker_and_makes_text_storable() -> None:
    assert bounded(None) is None
    assert bounded("short") == "short"
    cut = bounded("x" * 100_000)
    assert len(cut) == MESSAGE_LIMIT
    assert cut.endswith("(96000 characters cut)")
    assert bounded("a\x00b\ud800c") == "a\\x00b\\ud800c"  # PostgreSQL text, UTF-8
    assert len(bounded("y" * 50, 10)) <= 10 + 30


def test_brief_quotes_a_short_prefix_of_each_long_run() -> None:
    message = f'Message type "T" has no field named "{"n" * 70_000}" at "T".'
    short = brief(message)
    assert short.startswith('Message type "T" has no field named "' + "n" * QUOTE_LIMIT + "…")
    assert "69920 characters" in short
    assert len(brief("word " * 10_000)) <= BRIEF_LIMIT


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


@pytest.mark.parametrize(
    ("amount", "plain"),
    [
        ("0.00000050", "0.00000050"),
        ("5E+3", "5000"),
        ("1.5E-10", "0.00000000015"),
        ("100.00", "100.00"),
        ("-0.10", "-0.10"),
    ],
)
def test_decimals_are_written_as_plain_strings(amount, plain) -> None:
    from decimal import Decimal

    from outbox.payload import plain_decimal

    assert plain_decimal(Decimal(amount)) == plain


@pytest.mark.parametrize("amount", ["NaN", "sNaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(amount) -> None:
    from decimal import Decimal

    from outbox.payload import plain_decimal

    with pytest.raises(BadRowError, match="not a number"):
        plain_decimal(Decimal(amount))
