"""The Recrypt simulator over a real loopback gRPC channel: no mocks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from outbox.descriptors import Catalog
from outbox.resources import protos_dir
from outbox.simulator import (
    CANCEL_ORDER,
    GET_BALANCES,
    MAINTENANCE_CHECK,
    PLACE_ORDER,
    STREAM_ORDER_UPDATES,
    TRANSFER,
    Fault,
    Simulator,
)

API = [("apikey", "test-key")]
SC = grpc.StatusCode
SEND = "/acme.payments.v2.Payments/Send"
LOOKUP = "/acme.payments.v2.Payments/Lookup"

ACME_PROTO = """
syntax = "proto3";
package acme.payments.v2;
service Payments {
  rpc Send(SendRequest) returns (SendResponse);
  rpc Lookup(LookupRequest) returns (SendResponse);
}
message SendRequest { string idempotency_key = 1; string to = 2; string amount = 3; }
message SendResponse { string payment_id = 1; }
message LookupRequest { string payment_id = 1; }
"""


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


@pytest.fixture
def sim(catalog: Catalog) -> Iterator[Simulator]:
    with Simulator(catalog) as simulator:
        yield simulator


@pytest.fixture
def channel(sim: Simulator) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(sim.target) as ch:
        yield ch


def key() -> str:
    return str(uuid.uuid4())


def call(
    channel: grpc.Channel,
    catalog: Catalog,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    metadata: list[tuple[str, str]] | None = API,
    timeout: float = 5.0,
) -> Any:
    method = catalog.methods[path]
    request = json_format.ParseDict(body or {}, method.request_class())
    stub = channel.unary_unary(
        path,
        request_serializer=method.request_class.SerializeToString,
        response_deserializer=method.response_class.FromString,
    )
    return stub(request, metadata=metadata, timeout=timeout)


def transfer_body(k: str, amount: str = "10.00", **extra: str) -> dict[str, str]:
    body = {"idempotency_key": k, "from_account": "A", "to_account": "B", "amount": amount}
    return {"currency": "AUD", **body, **extra}


def order_body(k: str, order_type: str = "ORDER_TYPE_LIMIT", account: str = "A") -> dict[str, str]:
    return {
        "idempotency_key": k,
        "account": account,
        "market": "BTC-AUD",
        "side": "SIDE_BUY",
        "type": order_type,
        "quantity": "0.5",
        "limit_price": "90000.00",
    }


def rpc_error(fn: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


# -- idempotency ---------------------------------------------------------------------------


def test_transfer_ok_then_same_key_already_exists(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog
) -> None:
    k = key()
    response = call(channel, catalog, TRANSFER, transfer_body(k))
    assert response.transfer_id
    assert response.executed_at.endswith("Z")
    err = rpc_error(call, channel, catalog, TRANSFER, transfer_body(k))
    assert err.code() == SC.ALREADY_EXISTS
    assert sim.executions(k) == 1
    assert sim.executed_keys() == {k}
    [entry] = sim.ledger
    assert (entry.key, entry.method) == (k, TRANSFER)
    assert entry.request["amount"] == "10.00"
    assert entry.response["transfer_id"] == response.transfer_id
    assert sim.balance("A", "AUD") == Decimal("-10.00")
    assert sim.balance("B", "AUD") == Decimal("10.00")
    assert [c.code for c in sim.calls] == ["OK", "ALREADY_EXISTS"]
    assert [c.executed for c in sim.calls] == [True, False]


def test_key_is_global_across_rpcs(sim: Simulator, channel: grpc.Channel, catalog: Catalog) -> None:
    k = key()
    call(channel, catalog, TRANSFER, transfer_body(k))
    err = rpc_error(call, channel, catalog, PLACE_ORDER, order_body(k))
    assert err.code() == SC.ALREADY_EXISTS
    assert sim.executions(k) == 1
    assert [e.method for e in sim.ledger] == [TRANSFER]


def test_empty_key_is_invalid_argument(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog
) -> None:
    err = rpc_error(call, channel, catalog, TRANSFER, transfer_body(""))
    assert err.code() == SC.INVALID_ARGUMENT
    assert err.details() == "idempotency_key required"
    assert sim.ledger == []


def test_concurrent_duplicates_execute_once(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog
) -> None:
    keys = [key() for _ in range(16)]

    def send(k: str) -> str:
        try:
            call(channel, catalog, TRANSFER, transfer_body(k, "1"))
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return "OK"

    with ThreadPoolExecutor(max_workers=64) as pool:
        codes = list(pool.map(send, keys * 4))
    assert codes.count("OK") == 16
    assert codes.count("ALREADY_EXISTS") == 48
    assert all(sim.executions(k) == 1 for k in keys)
    assert sim.balance("B", "AUD") == Decimal(16)


# -- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [[("apikey", "wrong")], [], [("other", "test-key")]])
def test_bad_or_missing_apikey_is_unauthenticated(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog, metadata: list[tuple[str, str]]
) -> None:
    err = rpc_error(call, channel, catalog, TRANSFER, transfer_body(key()), metadata=metadata)
    assert (err.code(), err.details()) == (SC.UNAUTHENTICATED, "Session key")
    assert sim.ledger == []
    [record] = sim.calls
    assert record.code == "UNAUTHENTICATED"
    assert record.had_apikey == (metadata == [("apikey", "wrong")])
    assert "wrong" not in repr(record)


def test_api_keys_can_be_rotated(sim: Simulator, channel: grpc.Channel, catalog: Catalog) -> None:
    sim.set_api_keys(["new-key"])
    err = rpc_error(call, channel, catalog, MAINTENANCE_CHECK)
    assert err.code() == SC.UNAUTHENTICATED
    call(channel, catalog, MAINTENANCE_CHECK, metadata=[("apikey", "new-key")])


# -- business logic ------------------------------------------------------------------------


def test_transfer_over_limit_is_failed_precondition_and_keeps_the_key(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog
) -> None:
    k = key()
    err = rpc_error(call, channel, catalog, TRANSFER, transfer_body(k, "10000.01"))
    assert err.code() == SC.FAILED_PRECONDITION
    assert err.details().startswith("transaction limit exceeded: ")
    assert sim.executions(k) == 0
    sim.transfer_limit = Decimal("20000")
    call(channel, catalog, TRANSFER, transfer_body(k, "10000.01"))
    assert sim.executions(k) == 1


@pytest.mark.parametrize(
    "body",
    [
        transfer_body("k", "-1"),
        transfer_body("k", "0"),
        transfer_body("k", "1e3"),
        transfer_body("k", "ten"),
        transfer_body("k", from_account=""),
        transfer_body("k", to_account=""),
    ],
)
def test_bad_transfer_is_invalid_argument(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog, body: dict[str, str]
) -> None:
    err = rpc_error(call, channel, catalog, TRANSFER, body)
    assert err.code() == SC.INVALID_ARGUMENT
    assert sim.ledger == []


def test_get_balances(sim: Simulator, channel: grpc.Channel, catalog: Catalog) -> None:
    call(channel, catalog, TRANSFER, transfer_body(key(), "2.50"))
    call(channel, catalog, TRANSFER, transfer_body(key(), "1", currency="BTC"))
    response = call(channel, catalog, GET_BALANCES, {"account": "B"})
    assert [(b.currency, b.amount) for b in response.balances] == [("AUD", "2.50"), ("BTC", "1")]


def test_orders_open_fill_and_cancel(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog
) -> None:
    status = catalog.methods[PLACE_ORDER].response_class.DESCRIPTOR.fields_by_name["status"]
    name = {v.number: v.name for v in status.enum_type.values}
    limit = call(channel, catalog, PLACE_ORDER, order_body(key()))
    market = call(channel, catalog, PLACE_ORDER, order_body(key(), "ORDER_TYPE_MARKET"))
    assert name[limit.status] == "ORDER_STATUS_OPEN"
    assert name[market.status] == "ORDER_STATUS_FILLED"
    cancel = {"account": "A", "order_id": limit.order_id}
    done = call(channel, catalog, CANCEL_ORDER, {"idempotency_key": key(), **cancel})
    assert (done.order_id, name[done.status]) == (limit.order_id, "ORDER_STATUS_CANCELLED")
    for order_id in (limit.order_id, market.order_id, "no-such-order"):
        body = {"idempotency_key": key(), "account": "A", "order_id": order_id}
        err = rpc_error(call, channel, catalog, CANCEL_ORDER, body)
        assert err.code() == SC.FAILED_PRECONDITION
        assert err.details().startswith("order not open")


def test_maintenance_check_reports_rollover(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog
) -> None:
    quiet = call(channel, catalog, MAINTENANCE_CHECK)
    assert (quiet.maintenance_mode, quiet.rollover_scheduled, quiet.rollover_start) == (
        False,
        False,
        "",
    )
    start = datetime(2025, 1, 7, 18, 0, tzinfo=UTC)
    sim.set_rollover(start, start.replace(minute=30), notice="rollover this week")
    busy = call(channel, catalog, MAINTENANCE_CHECK)
    assert busy.rollover_scheduled
    assert (busy.rollover_start, busy.rollover_end) == (
        "2025-01-07T18:00:00Z",
        "2025-01-07T18:30:00Z",
    )
    assert busy.notice == "rollover this week"


def test_maintenance_mode_denies_everything_including_the_check(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog
) -> None:
    sim.set_maintenance(True)
    for path, body in ((MAINTENANCE_CHECK, {}), (TRANSFER, transfer_body(key()))):
        err = rpc_error(call, channel, catalog, path, body)
        assert err.code() == SC.PERMISSION_DENIED
        assert "https://x.com/RecryptCS" in err.details()
    assert sim.ledger == []
    sim.set_maintenance(False)
    assert call(channel, catalog, MAINTENANCE_CHECK).maintenance_mode is False


# -- fault injection -----------------------------------------------------------------------

GUIDE_ROWS = [
    (SC.UNAUTHENTICATED, "Session key"),
    (SC.UNAVAILABLE, "vgw-db"),
    (SC.PERMISSION_DENIED, "maintenance mode"),
    (SC.ALREADY_EXISTS, "idempotency key used"),
    (SC.DEADLINE_EXCEEDED, "vgw-db"),
    (SC.NOT_FOUND, "method removed"),
    (SC.UNIMPLEMENTED, "not implemented"),
    (SC.FAILED_PRECONDITION, "compliance question pending"),
    (SC.RESOURCE_EXHAUSTED, "100"),
    (SC.RESOURCE_EXHAUSTED, "rate limited"),
    (SC.UNKNOWN, "boom"),
    (SC.INTERNAL, "boom"),
    (SC.ABORTED, "boom"),
    (SC.DATA_LOSS, "boom"),
    (SC.CANCELLED, "boom"),
    (SC.INVALID_ARGUMENT, "bad"),
    (SC.OUT_OF_RANGE, "bad"),
]


@pytest.mark.parametrize(("code", "message"), GUIDE_ROWS)
def test_every_error_row_can_be_injected(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog, code: grpc.StatusCode, message: str
) -> None:
    k = key()
    fault = sim.inject(Fault(code, message))
    err = rpc_error(call, channel, catalog, TRANSFER, transfer_body(k))
    assert (err.code(), err.details()) == (code, message)
    assert sim.executions(k) == 0
    assert fault.hits == 1
    assert sim.calls[-1].code == code.name


@pytest.mark.parametrize(
    ("code", "message"), [(SC.UNAVAILABLE, "vgw-db"), (SC.DEADLINE_EXCEEDED, "vgw-db")]
)
def test_executed_fault_has_effect_then_resend_is_already_exists(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog, code: grpc.StatusCode, message: str
) -> None:
    k = key()
    sim.inject(Fault(code, message, execute=True, times=1))
    err = rpc_error(call, channel, catalog, TRANSFER, transfer_body(k))
    assert (err.code(), err.details()) == (code, message)
    assert sim.executions(k) == 1
    assert sim.calls[-1].executed
    err = rpc_error(call, channel, catalog, TRANSFER, transfer_body(k))
    assert err.code() == SC.ALREADY_EXISTS
    assert sim.executions(k) == 1


def test_fault_times_expire(sim: Simulator, channel: grpc.Channel, catalog: Catalog) -> None:
    k = key()
    fault = sim.inject(Fault(SC.UNAVAILABLE, "vgw-db", times=2))
    for _ in range(2):
        assert (
            rpc_error(call, channel, catalog, TRANSFER, transfer_body(k)).code() == SC.UNAVAILABLE
        )
    call(channel, catalog, TRANSFER, transfer_body(k))
    assert fault.hits == 2
    assert fault.exhausted
    assert [c.code for c in sim.calls] == ["UNAVAILABLE", "UNAVAILABLE", "OK"]


def test_fault_filters_by_method_and_key_first_match_wins(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog
) -> None:
    hit, miss = key(), key()
    sim.inject(Fault(SC.FAILED_PRECONDITION, "limit", keys=frozenset({hit})))
    sim.inject(Fault(SC.NOT_FOUND, "removed", methods=frozenset({PLACE_ORDER})))
    sim.inject(Fault(SC.INTERNAL, "never reached", methods=frozenset({PLACE_ORDER})))
    err = rpc_error(call, channel, catalog, TRANSFER, transfer_body(hit))
    assert err.code() == SC.FAILED_PRECONDITION
    call(channel, catalog, TRANSFER, transfer_body(miss))
    assert rpc_error(call, channel, catalog, PLACE_ORDER, order_body(key())).code() == SC.NOT_FOUND
    sim.clear_faults()
    call(channel, catalog, PLACE_ORDER, order_body(key()))


def test_hang_past_client_deadline_still_executes(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog
) -> None:
    k, release = key(), threading.Event()
    sim.inject(Fault(SC.OK, hang=release, times=1))
    err = rpc_error(call, channel, catalog, TRANSFER, transfer_body(k), timeout=0.2)
    assert err.code() == SC.DEADLINE_EXCEEDED  # the client's own deadline
    assert sim.executions(k) == 0
    release.set()
    assert sim.wait_for(lambda s: s.executions(k) == 1, timeout=5)
    assert rpc_error(call, channel, catalog, TRANSFER, transfer_body(k)).code() == SC.ALREADY_EXISTS


def test_delay_is_released_by_stop(catalog: Catalog) -> None:
    sim = Simulator(catalog)
    sim.start()
    sim.inject(Fault(SC.UNAVAILABLE, "vgw-db", delay=60))
    with grpc.insecure_channel(sim.target) as ch:
        err = rpc_error(call, ch, catalog, MAINTENANCE_CHECK, timeout=0.2)
    assert err.code() == SC.DEADLINE_EXCEEDED
    sim.stop()
    assert sim.wait_for(lambda s: s.call_count(MAINTENANCE_CHECK) == 1, timeout=5)


def test_wait_for_times_out(sim: Simulator) -> None:
    assert sim.wait_for(lambda s: len(s.ledger) > 0, timeout=0.01) is False


def test_call_count_by_method_and_time(catalog: Catalog) -> None:
    now = [datetime(2025, 1, 1, tzinfo=UTC)]
    with Simulator(catalog, clock=lambda: now[0]) as sim, grpc.insecure_channel(sim.target) as ch:
        call(ch, catalog, MAINTENANCE_CHECK)
        now[0] = datetime(2025, 1, 2, tzinfo=UTC)
        call(ch, catalog, TRANSFER, transfer_body(key()))
        assert sim.call_count() == 2
        assert sim.call_count(TRANSFER) == 1
        assert sim.call_count(since=now[0]) == 1
        assert sim.ledger[0].at == now[0]


# -- streams -------------------------------------------------------------------------------


def open_stream(channel: grpc.Channel, catalog: Catalog, account: str = "A") -> Any:
    method = catalog.methods[STREAM_ORDER_UPDATES]
    stub = channel.unary_stream(
        STREAM_ORDER_UPDATES,
        request_serializer=method.request_class.SerializeToString,
        response_deserializer=method.response_class.FromString,
    )
    return stub(method.request_class(account=account), metadata=API, timeout=10)


def test_stream_gets_updates_and_ends_ok(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog
) -> None:
    stream = open_stream(channel, catalog)
    assert sim.wait_for(lambda s: s.open_streams == 1, timeout=5)
    k = key()
    call(channel, catalog, PLACE_ORDER, order_body(k, account="other"))
    placed = call(channel, catalog, PLACE_ORDER, order_body(k2 := key()))
    update = next(stream)
    assert (update.order_id, update.idempotency_key, update.filled_quantity) == (
        placed.order_id,
        k2,
        "0",
    )
    sim.end_streams()
    assert list(stream) == []
    assert stream.code() == SC.OK
    assert sim.wait_for(lambda s: s.open_streams == 0, timeout=5)
    assert sim.calls[-1].method == STREAM_ORDER_UPDATES


def test_stream_can_fail(sim: Simulator, channel: grpc.Channel, catalog: Catalog) -> None:
    stream = open_stream(channel, catalog)
    assert sim.wait_for(lambda s: s.open_streams == 1, timeout=5)
    sim.end_streams(SC.UNAVAILABLE, "vgw-db")
    err = rpc_error(list, stream)
    assert (err.code(), err.details()) == (SC.UNAVAILABLE, "vgw-db")
    sim.inject(Fault(SC.UNAVAILABLE, "vgw-db", methods=frozenset({STREAM_ORDER_UPDATES})))
    err = rpc_error(list, open_stream(channel, catalog))
    assert err.code() == SC.UNAVAILABLE


def test_stream_client_cancel_unsubscribes(
    sim: Simulator, channel: grpc.Channel, catalog: Catalog
) -> None:
    stream = open_stream(channel, catalog)
    assert sim.wait_for(lambda s: s.open_streams == 1, timeout=5)
    stream.cancel()
    assert sim.wait_for(lambda s: s.open_streams == 0, timeout=5)


# -- other proto packages, TLS, the CLI entry point ------------------------------------------


@pytest.fixture
def two_packages(tmp_path: Path) -> Catalog:
    root = tmp_path / "protos"
    shutil.copytree(protos_dir(), root)
    acme = root / "acme" / "payments" / "v2"
    acme.mkdir(parents=True)
    (acme / "payments.proto").write_text(ACME_PROTO)
    return Catalog.load(root)


def test_second_package_is_served_generically(two_packages: Catalog) -> None:
    with Simulator(two_packages) as sim, grpc.insecure_channel(sim.target) as ch:
        k = key()
        response = call(ch, two_packages, SEND, {"idempotency_key": k, "to": "x", "amount": "1"})
        assert response == two_packages.methods[SEND].response_class()
        assert rpc_error(call, ch, two_packages, SEND, {"idempotency_key": k}).code() == (
            SC.ALREADY_EXISTS
        )
        err = rpc_error(call, ch, two_packages, PLACE_ORDER, order_body(k))
        assert err.code() == SC.ALREADY_EXISTS
        assert rpc_error(call, ch, two_packages, LOOKUP).code() == SC.UNIMPLEMENTED
        [entry] = sim.ledger
        assert (entry.method, entry.request["to"]) == (SEND, "x")
        call(ch, two_packages, TRANSFER, transfer_body(key()))


def self_signed(tmp_path: Path) -> tuple[bytes, bytes]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, private = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(private), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert.read_bytes(), private.read_bytes()


def test_tls(catalog: Catalog, tmp_path: Path) -> None:
    cert, private = self_signed(tmp_path)
    sim = Simulator(catalog)
    port = sim.start(tls=(cert, private))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
            call(ch, catalog, MAINTENANCE_CHECK)
    finally:
        sim.stop()


def test_main_serve_runs_until_sigterm(catalog: Catalog) -> None:
    code = (
        "from outbox.simulator import main_serve; "
        "main_serve('127.0.0.1:0', ['secret-key'], ['UNAVAILABLE:vgw-db@"
        f"{TRANSFER}:x1'], '500', None)"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("simulator listening on 127.0.0.1:")
        assert line.rstrip().endswith("(plaintext)")
        target = line.split()[3]
        with grpc.insecure_channel(target) as ch:
            md = [("apikey", "secret-key")]
            err = rpc_error(call, ch, catalog, TRANSFER, transfer_body(key()), metadata=md)
            assert err.code() == SC.UNAVAILABLE
            err = rpc_error(call, ch, catalog, TRANSFER, transfer_body(key(), "501"), metadata=md)
            assert err.code() == SC.FAILED_PRECONDITION
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "secret-key" not in line + proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


# -- Fault.parse ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("UNAVAILABLE:vgw-db", Fault(SC.UNAVAILABLE, "vgw-db")),
        ("unavailable", Fault(SC.UNAVAILABLE)),
        ("UNAVAILABLE:vgw-db:execute", Fault(SC.UNAVAILABLE, "vgw-db", execute=True)),
        ("UNAVAILABLE:vgw-db:x3", Fault(SC.UNAVAILABLE, "vgw-db", times=3)),
        (
            "DEADLINE_EXCEEDED:vgw-db:execute:x1",
            Fault(SC.DEADLINE_EXCEEDED, "vgw-db", True, times=1),
        ),
        (
            f"FAILED_PRECONDITION:compliance question pending@{TRANSFER}",
            Fault(
                SC.FAILED_PRECONDITION, "compliance question pending", methods=frozenset({TRANSFER})
            ),
        ),
        (
            f"RESOURCE_EXHAUSTED:100@{TRANSFER},{PLACE_ORDER}:x2",
            Fault(
                SC.RESOURCE_EXHAUSTED, "100", methods=frozenset({TRANSFER, PLACE_ORDER}), times=2
            ),
        ),
        (
            f"UNAVAILABLE:vgw-db:execute@{TRANSFER}",
            Fault(SC.UNAVAILABLE, "vgw-db", execute=True, methods=frozenset({TRANSFER})),
        ),
        (
            "FAILED_PRECONDITION:transaction limit exceeded: ask support",
            Fault(SC.FAILED_PRECONDITION, "transaction limit exceeded: ask support"),
        ),
        ("OK:delay=1.5", Fault(SC.OK, delay=1.5)),
        (
            "PERMISSION_DENIED:mail ops@example.com",
            Fault(SC.PERMISSION_DENIED, "mail ops@example.com"),
        ),
    ],
)
def test_fault_parse(spec: str, expected: Fault) -> None:
    got = Fault.parse(spec)
    fields = ("code", "message", "execute", "methods", "keys", "times", "delay")
    assert [getattr(got, f) for f in fields] == [getattr(expected, f) for f in fields]


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "NOPE:vgw-db",
        "UNAVAILABLE:vgw-db:x0",
        "UNAVAILABLE@Transfer",
        "OK:delay=1.2.3",
        "@/a.B/C",
    ],
)
def test_fault_parse_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match=r"expected CODE\[:MESSAGE\]"):
        Fault.parse(spec)
