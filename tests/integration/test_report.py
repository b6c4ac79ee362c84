"""Reconciliation (``outbox report``) on real databases: the report's sums against what the
simulator's ledger executed after a run with every outcome; the field map from the protos'
marks and ``[report]``; the streamed read; the command."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import outbox
from outbox.cli import main
from outbox.clock import utcnow
from outbox.descriptors import Catalog
from outbox.errors import ConfigError
from outbox.report import FieldPath, build_report
from outbox.schema import messages
from outbox.simulator import PLACE_ORDER, TRANSFER, Fault
from outbox.vocabulary import ReportColumn

C = grpc.StatusCode
COMMITTED, PARKED, EXPIRED = ReportColumn.COMMITTED, ReportColumn.PARKED, ReportColumn.EXPIRED
CANCELLED, IN_DOUBT = ReportColumn.CANCELLED, ReportColumn.IN_DOUBT
#: What the simulator's ledger says was moved: (method → amount field, currency field).
LEDGER_FIELDS = {TRANSFER: ("amount", "currency"), PLACE_ORDER: ("quantity", "market")}


def transfer(amount: str, currency: str = "AUD") -> dict[str, str]:
    return {"fromAccount": "acc-1", "toAccount": "acc-2", "amount": amount, "currency": currency}


def order(quantity: str) -> dict[str, str]:
    return {
        "account": "acc-1",
        "market": "BTC-AUD",
        "side": "SIDE_BUY",
        "type": "ORDER_TYPE_LIMIT",
        "quantity": quantity,
        "limitPrice": "100000.00",
    }


def add(engine, method: str, payload: dict[str, str], **kwargs) -> str:
    with engine.begin() as conn:
        return outbox.enqueue(conn, method, payload, **kwargs)


def ledger_sums(sim, leave_out: set[str] = frozenset()) -> dict[tuple[str, str], Decimal]:
    sums: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for entry in sim.ledger:
        if entry.method in LEDGER_FIELDS and entry.key not in leave_out:
            amount, currency = LEDGER_FIELDS[entry.method]
            sums[(entry.method, entry.request[currency])] += Decimal(entry.request[amount])
    return dict(sums)


def test_report_matches_the_simulators_ledger_after_every_outcome(
    engine, sim, store, catalog, make_dispatcher, clock
) -> None:
    clock.now = utcnow()
    committed = {
        "ok_aud": add(engine, TRANSFER, transfer("10.01")),
        "ok_aud_2": add(engine, TRANSFER, transfer("0.99")),
        "ok_btc": add(engine, TRANSFER, transfer("0.5", "BTC")),
        "order": add(engine, PLACE_ORDER, order("0.015")),
        "order_2": add(engine, PLACE_ORDER, order("0.25")),
        "already_exists": add(engine, TRANSFER, transfer("20.02")),
    }
    precondition = add(engine, TRANSFER, transfer("20000.00"))  # over the limit: parked
    to_cancel = add(engine, TRANSFER, transfer("15000.00"))  # parked, then cancelled
    doubt_parked = add(engine, TRANSFER, transfer("40.04"))  # deadline, never executed
    doubt_cancelled = add(engine, TRANSFER, transfer("50.05"))  # deadline, executed late
    expiring = add(
        engine,
        TRANSFER,
        transfer("7.77"),
        not_before=clock.now + timedelta(hours=1),
        expires_at=clock.now + timedelta(minutes=30),
    )
    sim.inject(Fault(C.INTERNAL, "oops", execute=True, times=1, keys={committed["already_exists"]}))
    sim.inject(Fault(C.DEADLINE_EXCEEDED, "deadline", keys={doubt_parked}))
    sim.inject(Fault(C.OK, delay=3.0, keys={doubt_cancelled}))  # past the client's deadline
    dispatcher = make_dispatcher(deadline=2.0, max_unknown_attempts=2)
    dispatcher.run_once()
    clock.advance(200)  # past the backoff: the second unknown outcome parks, INTERNAL commits
    dispatcher.run_once()
    assert sim.wait_for(lambda s: s.executions(doubt_cancelled) == 1)
    clock.advance(1800)
    assert store.expire_due(clock.now) == (1, 0)
    assert store.get(expiring).state == "expired"
    store.cancel(to_cancel, "finance-test", "duplicate", clock.now, force=False)
    store.cancel(doubt_cancelled, "finance-test", "checked", clock.now, force=True)

    states = {k: store.get(k).state for k in [*committed.values(), precondition, doubt_parked]}
    assert set(states.values()) == {"committed", "parked"}
    assert store.get(doubt_parked).park_reason == "unknown_outcome"
    assert store.get(committed["already_exists"]).last_code == "ALREADY_EXISTS"

    since, until = clock.now - timedelta(days=1), clock.now + timedelta(days=1)
    report = build_report(store, since, until, catalog.report_fields())
    aud, btc, market = (TRANSFER, "AUD"), (TRANSFER, "BTC"), (PLACE_ORDER, "BTC-AUD")
    # committed is what Recrypt executed, less what is still in doubt (and was executed)
    executed = ledger_sums(sim)
    assert report.totals(COMMITTED) == ledger_sums(sim, leave_out={doubt_cancelled})
    assert executed[aud] - report.totals(COMMITTED)[aud] == Decimal("50.05")
    assert executed[aud] - report.totals(COMMITTED)[aud] <= report.totals(IN_DOUBT)[aud]
    assert report.totals(COMMITTED) == {
        aud: Decimal("31.02"),
        btc: Decimal("0.5"),
        market: Decimal("0.265"),
    }
    assert report.totals(PARKED)[aud] == Decimal("20040.04")
    assert report.totals(CANCELLED)[aud] == Decimal("15050.05")
    assert report.totals(EXPIRED)[aud] == Decimal("7.77")
    assert report.totals(IN_DOUBT)[aud] == Decimal("90.09")
    counts = defaultdict(int)
    for line in report.lines:
        for column in ReportColumn:
            counts[column] += line.cells[column].count
        assert line.unreadable == 0
    assert dict(counts) == {COMMITTED: 6, PARKED: 2, EXPIRED: 1, CANCELLED: 2, IN_DOUBT: 2}


def test_finished_rows_stream_the_range_in_chunks_with_the_payload_as_stored(engine, store) -> None:
    at = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
    amounts = [f"{i}.{i:03d}0" for i in range(7)]
    for i, amount in enumerate(amounts):
        key = add(engine, TRANSFER, transfer(amount))
        with engine.begin() as conn:
            conn.execute(
                sa.update(messages)
                .where(messages.c.idempotency_key == key)
                .values(state="committed", updated_at=at + timedelta(hours=i))
            )
    rows = list(store.finished_rows(at + timedelta(hours=1), at + timedelta(hours=5), chunk=2))
    assert [json.loads(r.payload)["amount"] for r in rows] == amounts[1:5]  # [since, until)
    assert {r.state for r in rows} == {"committed"}
    assert all(r.finished_at.tzinfo is not None for r in rows)
    add(engine, TRANSFER, transfer("1"))  # pending: never in the report
    assert list(store.finished_rows(at - timedelta(days=1), at + timedelta(days=1000))) != []
    assert all(r.state == "committed" for r in store.finished_rows(at, at + timedelta(days=1)))


# ---- the field map: the protos' marks, [report], and their errors

NESTED = """
syntax = "proto3";
package acme.pay.v1;
import "recrypt/options/v1/options.proto";
service Pay {
  rpc Send(SendRequest) returns (SendReply);
  rpc Twice(TwiceRequest) returns (SendReply);
  rpc Plain(PlainRequest) returns (SendReply);
}
message Money {
  string unit_amount = 1 [(recrypt.options.v1.amount) = true];
  string currency_code = 2 [(recrypt.options.v1.currency) = true];
}
message SendRequest {
  string idempotency_key = 1;
  Money money = 2;
  repeated Money fees = 3;
}
message TwiceRequest {
  string idempotency_key = 1;
  string amount = 2 [(recrypt.options.v1.amount) = true];
  Money money = 3;
}
message PlainRequest {
  string idempotency_key = 1;
  string value = 2;
  string ccy = 3;
  int64 count = 4;
}
message SendReply {}
"""


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    root = tmp_path_factory.mktemp("acme_report")
    options = Path(outbox.__file__).parents[1] / "protos" / "recrypt" / "options" / "v1"
    (root / "recrypt" / "options" / "v1").mkdir(parents=True)
    (root / "recrypt" / "options" / "v1" / "options.proto").write_text(
        (options / "options.proto").read_text()
    )
    (root / "acme").mkdir()
    (root / "acme" / "pay.proto").write_text(NESTED)
    return Catalog.load(root)


def test_the_model_protos_mark_transfer_and_order_amounts(catalog) -> None:
    fields = catalog.report_fields()
    assert set(fields) == {TRANSFER, PLACE_ORDER}  # CancelOrder moves nothing: counted only
    assert fields[TRANSFER].amount == FieldPath((("amount",),))
    assert fields[PLACE_ORDER].amount.dotted == "quantity"
    assert fields[PLACE_ORDER].currency.dotted == "market"


def test_marks_in_nested_messages_are_found_in_both_spellings(acme) -> None:
    with pytest.raises(ConfigError, match=r"mark 2 fields of /acme.pay.v1.Pay/Twice.*amount"):
        acme.report_fields()
    fields = acme.report_fields({"/acme.pay.v1.Pay/Twice": "amount"})
    send = fields["/acme.pay.v1.Pay/Send"]
    assert send.amount.steps == (("money",), ("unit_amount", "unitAmount"))
    assert send.currency.steps == (("money",), ("currency_code", "currencyCode"))


def test_report_config_names_fields_per_method_or_globally(acme) -> None:
    twice = {"/acme.pay.v1.Pay/Twice": "money.unit_amount"}
    fields = acme.report_fields(twice | {"/acme.pay.v1.Pay/Plain": "value"})
    assert fields["/acme.pay.v1.Pay/Twice"].amount.dotted == "money.unit_amount"
    assert fields["/acme.pay.v1.Pay/Plain"].amount.dotted == "value"
    assert fields["/acme.pay.v1.Pay/Plain"].currency is None
    with pytest.raises(ConfigError):  # a list cannot settle Twice's two marks
        acme.report_fields(["value"], ["ccy"])


@pytest.mark.parametrize(
    ("amount_fields", "says"),
    [
        (
            {TRANSFER: "amt"},
            r'\[report\] amount_fields\."/recrypt.wallet.v1.Wallet/Transfer".*no field',
        ),
        ({"/x.Y/Z": "amount"}, r'\[report\] amount_fields\."/x.Y/Z": no submittable method'),
        (["nope"], r"\[report\] amount_fields: 'nope' is a string field of no method"),
    ],
)
def test_a_report_field_that_does_not_exist_is_a_config_error_naming_the_key(
    catalog, amount_fields, says
) -> None:
    with pytest.raises(ConfigError, match=says):
        catalog.report_fields(amount_fields)


def test_a_report_field_that_is_not_a_string_is_refused(acme) -> None:
    twice = {"/acme.pay.v1.Pay/Twice": "amount"}
    with pytest.raises(ConfigError, match="not a string field"):
        acme.report_fields(twice | {"/acme.pay.v1.Pay/Plain": "count"})
    with pytest.raises(ConfigError, match=r"has no field 'fees\.unit_amount'"):
        acme.report_fields(twice | {"/acme.pay.v1.Pay/Send": "fees.unit_amount"})


# ---- the command


def test_outbox_report_csv_json_and_table(sqlite_url, tmp_path) -> None:
    engine = sa.create_engine(sqlite_url)
    at = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
    for amount, state, maybe in [("10.10", "committed", False), ("2.5", "parked", True)]:
        key = add(engine, TRANSFER, transfer(amount))
        with engine.begin() as conn:
            conn.execute(
                sa.update(messages)
                .where(messages.c.idempotency_key == key)
                .values(state=state, updated_at=at, maybe_executed=maybe)
            )
    engine.dispose()
    env = {"OUTBOX_DATABASE_URL": sqlite_url, "OUTBOX_CONFIG": None, "COLUMNS": "160"}
    args = ["report", "--since", "2030-01-02", "--until", "2030-01-03"]
    result = CliRunner().invoke(main, [*args, "--csv"], env=env)
    assert result.exit_code == 0, result.output
    header, line = result.stdout.splitlines()
    values = dict(zip(header.split(","), line.split(","), strict=True))
    assert values["committed_amount"] == "10.10"
    assert (values["parked_amount"], values["in_doubt_amount"]) == ("2.5", "2.5")
    doc = json.loads(CliRunner().invoke(main, [*args, "--json"], env=env).stdout)
    assert doc["lines"][0]["in_doubt_count"] == 1
    table = CliRunner().invoke(main, args, env=env).stdout
    assert "10.10 (1)" in table
    assert "in doubt" in table
    config = tmp_path / "outbox.toml"
    config.write_text(f'[report]\namount_fields = {{ "{TRANSFER}" = "amt" }}\n')
    bad = CliRunner().invoke(main, ["--config", str(config), *args], env=env)
    assert bad.exit_code == 1
    assert '[report] amount_fields."/recrypt.wallet.v1.Wallet/Transfer"' in bad.stderr


def test_the_daemon_refuses_to_start_with_a_report_field_that_does_not_exist(
    sqlite_url, tmp_path
) -> None:
    from outbox.config import load
    from outbox.daemon import Daemon

    config = tmp_path / "outbox.toml"
    config.write_text(
        f'[database]\nurl = "{sqlite_url}"\n[metrics]\nlisten = ""\n'
        '[report]\ncurrency_fields = ["ccy"]\n'
    )
    with pytest.raises(ConfigError, match=r"\[report\] currency_fields: 'ccy'"):
        Daemon(load(config, env={"RECRYPT_API_KEY": "k"}))
