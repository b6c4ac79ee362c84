"""Every place the API key or a payload could leak, one test each.

The key is a marker (``LEAKCHECK-API-KEY-8c1f``) and every payload carries a marker memo
(``LEAKCHECK-PAYLOAD-memo``), so a leak is a plain substring search. Places covered:

- logs at INFO and above, as captured raw (``caplog``: what the code passes to the logger,
  before any redaction) and as written by ``outbox.logs``' text and JSON formatters;
- the database (every table the daemon writes);
- exception messages of config loading, and the reprs/dumps of the config and the client;
- the Prometheus exposition (labels come from fixed sets only);
- the CLI's output (``show`` prints the payload on purpose; the key never appears);
- what the simulator records about each call;
- the wire: the key travels only as ``apikey`` metadata, never inside the request message.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from pydantic import SecretStr
from sqlalchemy.engine import Engine

import outbox
from outbox import logs
from outbox.cli import main
from outbox.client import GrpcClient
from outbox.config import (
    Config,
    DatabaseConfig,
    MetricsConfig,
    RecryptConfig,
    RetryConfig,
    WorkerConfig,
    load,
)
from outbox.daemon import Daemon
from outbox.descriptors import Catalog, build_request
from outbox.errors import ConfigError
from outbox.metrics import HealthServer, Metrics
from outbox.simulator import MAINTENANCE_CHECK, TRANSFER, Fault, Simulator
from tests.integration.conftest import Clock

KEY = "LEAKCHECK-API-KEY-8c1f"
MEMO = "LEAKCHECK-PAYLOAD-memo"
MARKERS = (KEY, MEMO)
C = grpc.StatusCode


def transfer(amount: str = "10.00") -> dict[str, str]:
    return {
        "fromAccount": "acc-1",
        "toAccount": "acc-2",
        "amount": amount,
        "currency": "AUD",
        "memo": MEMO,
    }


def enqueue(engine: Engine, **kwargs: Any) -> str:
    with engine.begin() as conn:
        return outbox.enqueue(conn, TRANSFER, transfer(), **kwargs)


def assert_clean(text: str, *markers: str, where: str) -> None:
    for marker in markers or MARKERS:
        assert marker not in text, f"{marker} leaked into {where}: {text[:2000]}"


# --------------------------------------------------------------------------- a daemon scenario


@dataclasses.dataclass
class Scenario:
    daemon: Daemon
    sim: Simulator
    text_log: io.StringIO
    json_log: io.StringIO


def run(daemon: Daemon, service: str) -> None:
    """One step of one of the daemon's services, on the daemon's clock."""
    next(s for s in daemon.services if s.name == service).run_once(daemon.clock())


@pytest.fixture
def scenario(db_url: str, catalog: Catalog, clock: Clock, caplog) -> Iterator[Scenario]:
    """A real ``Daemon`` (its jobs called by hand, on the test clock) through: commit, retry
    with a rollover gate change, a precondition park, a bad row, a lease expiry, the gate
    reopening, and a refused key (the unauthenticated gate, rows handed back)."""
    sim = Simulator(catalog, api_keys=[KEY])
    sim.start()
    config = Config(
        database=DatabaseConfig(url=db_url),
        recrypt=RecryptConfig(target=sim.target, tls=False, deadline=5.0),
        worker=WorkerConfig(lease=30.0, notify=False),
        retry=RetryConfig(jitter=0.0),
        metrics=MetricsConfig(listen=""),
        api_key=SecretStr(KEY),
    )
    text_log, json_log = io.StringIO(), io.StringIO()
    handlers = []
    for stream, formatter in (
        (text_log, logs._TextFormatter()),
        (json_log, logs._JsonFormatter()),
    ):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.setLevel(logging.INFO)
        handlers.append(handler)
    root = logging.getLogger()
    caplog.set_level(logging.INFO)
    for handler in handlers:
        root.addHandler(handler)
    daemon = Daemon(config, clock=clock, check_clock=False)  # a simulated clock
    try:
        engine = daemon.engine
        committed, retried, parked = enqueue(engine), enqueue(engine), enqueue(engine)
        bad = str(uuid.uuid4())
        with engine.begin() as conn:  # a plain-SQL row that cannot parse, marker inside
            conn.execute(
                sa.text(
                    "INSERT INTO outbox_messages (idempotency_key, method, payload) "
                    "VALUES (:k, :m, :p)"
                ),
                {"k": bad, "m": TRANSFER, "p": json.dumps({"amount": "1", "memo": [MEMO]})},
            )
        sim.inject(Fault(C.UNAVAILABLE, "vgw-db", keys=frozenset({retried}), times=1))
        sim.inject(Fault(C.FAILED_PRECONDITION, "limit", keys=frozenset({parked}), times=1))
        daemon.dispatcher.run_once()  # commit, retry (rollover gate), park, bad row

        orphan = enqueue(engine)
        assert [c.idempotency_key for c in daemon.store.claim_due("ghost", 10, 30.0, clock())] == [
            orphan
        ]
        clock.advance(31)
        run(daemon, "reaper")  # lease_expired

        for _ in range(4):  # the rollover gate probes, then reopens; everything commits
            clock.advance(200)
            daemon.dispatcher.run_once()
        refused = enqueue(engine)
        sim.set_api_keys(["another-key"])
        clock.advance(200)
        daemon.dispatcher.run_once()  # UNAUTHENTICATED: handed back, gate closes
        run(daemon, "table")
        run(daemon, "heartbeat")
        states = {k: daemon.store.get(k).state for k in (committed, retried, parked, bad, orphan)}
        assert states == {
            committed: "committed",
            retried: "committed",
            parked: "parked",
            bad: "parked",
            orphan: "committed",
        }
        assert daemon.store.get(refused).state == "pending"
        yield Scenario(daemon, sim, text_log, json_log)
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        daemon.client.close()
        daemon.engine.dispose()
        sim.stop()


def test_logs_at_info_carry_neither_the_key_nor_the_payload(scenario, caplog) -> None:
    logged = caplog.get_records("setup") + caplog.get_records("call")  # the scenario is setup
    records = [r for r in logged if r.levelno >= logging.INFO]
    raw = "\n".join(r.getMessage() for r in records)
    for event in (
        "event=committed",
        "event=retry_scheduled",
        "event=parked",
        "reason=bad_row",
        "reason=precondition",
        "event=gate_changed gate=rollover",
        "event=gate_changed gate=open",
        "event=gate_changed gate=unauthenticated",
        "event=lease_expired",
        "event=handed_back",
    ):
        assert event in raw, f"the scenario should have logged {event}:\n{raw}"
    # Raw messages: the key is never even handed to a logger (redaction is a last resort).
    for record in records:
        assert_clean(record.getMessage(), where=f"log record {record.name}")
        assert record.exc_info is None or KEY not in str(record.exc_info[1])
    text, doc = scenario.text_log.getvalue(), scenario.json_log.getvalue()
    assert "event=committed" in text
    assert '"event": "committed"' in doc
    assert_clean(text, where="the text log")
    assert_clean(doc, where="the JSON log")


def test_the_database_never_holds_the_key(scenario) -> None:
    tables = sa.MetaData()
    tables.reflect(scenario.daemon.engine)
    with scenario.daemon.engine.connect() as conn:
        for table in tables.sorted_tables:
            rows = conn.execute(sa.select(table)).all()
            assert_clean(repr(rows), KEY, where=f"table {table.name}")


def test_the_simulator_never_records_the_key(scenario) -> None:
    sim = scenario.sim
    assert sim.calls, "the scenario made calls"
    assert all(c.had_apikey for c in sim.calls)  # a key was sent each time (even refused)
    assert "UNAUTHENTICATED" in {c.code for c in sim.calls}
    for call in sim.calls:
        assert_clean(repr(dataclasses.astuple(call)), KEY, where="Simulator.calls")
    assert_clean(repr(sim.ledger), KEY, where="Simulator.ledger")


# --------------------------------------------------------------------------- exceptions


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def config_failures(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """(what, thunk) pairs: each thunk must raise ConfigError."""
    env = {"RECRYPT_API_KEY": KEY}
    bad_value = _write(tmp_path / "bad.toml", "[worker]\nlease = -1\n")
    yield "an invalid value, key in env", lambda: load(bad_value, env=env)
    typo = _write(tmp_path / "typo.toml", f'[recrypt]\napi_key = "{KEY}"\n')
    yield "the key pasted under [recrypt]", lambda: load(typo, env={})
    unquoted = _write(tmp_path / "unquoted.toml", f"[recrypt]\napi_key = {KEY}\n")
    yield "the key pasted unquoted (bad TOML)", lambda: load(unquoted, env={})
    shared = _write(tmp_path / "shared-key", KEY + "\n", mode=0o644)
    shared_cfg = _write(tmp_path / "shared.toml", f'[recrypt]\napi_key_file = "{shared}"\n')
    yield "a group-readable key file", lambda: load(shared_cfg, env={})
    with_bad_value = _write(
        tmp_path / "key-and-bad.toml",
        f'[recrypt]\napi_key_file = "{tmp_path / "key"}"\ndeadline = "soon"\n',
    )
    _write(tmp_path / "key", KEY)
    yield "a key file and an invalid value", lambda: load(with_bad_value, env={})
    lease = _write(tmp_path / "lease.toml", "[worker]\nlease = 1\n")
    yield "a rule across sections, key in env", lambda: load(lease, env=env)
    yield "no key at all", lambda: load(None, env={}).require_api_key()


def test_config_errors_never_carry_the_key(tmp_path) -> None:
    for what, thunk in config_failures(tmp_path):
        with pytest.raises(ConfigError) as raised:
            thunk()
        text = f"{raised.value}\n{raised.value!r}\n{raised.value.args}"
        assert_clean(text, KEY, where=f"the ConfigError for {what}")
        assert raised.value.__cause__ is None or KEY not in str(raised.value.__cause__)


def test_config_and_client_reprs_never_carry_the_key(tmp_path) -> None:
    key_file = _write(tmp_path / "key", KEY)
    from_file = load(
        _write(tmp_path / "c.toml", f'[recrypt]\napi_key_file = "{key_file}"\n'), env={}
    )
    from_env = load(None, env={"RECRYPT_API_KEY": KEY})
    for config in (from_file, from_env):
        assert config.require_api_key().get_secret_value() == KEY  # it is there…
        shown = [
            repr(config),
            str(config),
            repr(config.model_dump()),
            config.model_dump_json(),
            repr(config.model_dump(mode="json")),
            repr(config.api_key),
            str(config.api_key),
            repr(config.recrypt),
            repr(vars(config)),
            f"{config}",
        ]
        for text in shown:  # …and never shown
            assert_clean(text, KEY, where="a Config repr/dump")
    client = GrpcClient(RecryptConfig(target="127.0.0.1:1", tls=False), KEY)
    try:
        assert_clean(f"{client!r} {client!s}", KEY, where="GrpcClient repr")
    finally:
        client.close()


def test_a_malformed_key_is_refused_before_any_call_without_quoting_it(catalog) -> None:
    """A key file with a second line: gRPC would refuse the metadata on every call, locally;
    the client refuses the key once, when it is built, and the error omits the value."""
    with Simulator(catalog, api_keys=[KEY]) as sim:
        with pytest.raises(ConfigError) as refused:
            GrpcClient(RecryptConfig(target=sim.target, tls=False), KEY + "\nsecond line")
        assert_clean(str(refused.value), KEY, where="the error")
        assert sim.calls == []


# --------------------------------------------------------------------------- metrics


def test_metrics_labels_never_carry_free_text() -> None:
    metrics = Metrics()
    adversarial = (KEY, MEMO, TRANSFER, f'x"}} 1\n{KEY}')
    for value in adversarial:
        metrics.observe_call(value, 0.01)
        metrics.observe_outcome(value)
        metrics.set_gate(value)
    metrics.set_table({KEY: 3, MEMO: 4, "pending": 1}, 1.0, 0, 0)
    exposition = metrics.render().decode()
    assert_clean(exposition, KEY, MEMO, TRANSFER, where="/metrics")
    assert 'outbox_attempts_total{code="other"} 4.0' in exposition
    assert 'outbox_outcomes_total{outcome="other"} 4.0' in exposition

    server = HealthServer("127.0.0.1:0", metrics, lambda: (True, "ready"))
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            served = reply.read().decode()
    finally:
        server.stop()
    assert_clean(served, KEY, MEMO, TRANSFER, where="/metrics over HTTP")


# --------------------------------------------------------------------------- CLI


def test_cli_output_never_carries_the_key_and_show_prints_the_payload(db_url, engine) -> None:
    key = enqueue(engine, reference="invoice-1")
    env: dict[str, str | None] = {
        "OUTBOX_DATABASE_URL": db_url,
        "RECRYPT_API_KEY": KEY,
        "OUTBOX_CONFIG": None,
        "COLUMNS": "200",
    }

    def run(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(main, list(args), env=env)
        output = result.stdout + result.stderr
        assert result.exit_code == code, output
        assert_clean(output, KEY, where=f"`outbox {' '.join(args)}`")
        return output

    shown = json.loads(run("show", key, "--json"))
    assert shown["row"]["payload"]["memo"] == MEMO  # deliberate: showing it is show's job
    assert MEMO in run("show", key)
    listed = json.loads(run("list", "--json"))
    assert [r["idempotency_key"] for r in listed["rows"]] == [key]
    assert MEMO not in json.dumps(listed)  # list leaves payloads out
    run("list")
    run("status")
    run("status", "--json")
    run("check", code=2)  # no live worker: critical, and still never the key
    run("db", "current")
    made = run("enqueue", TRANSFER, "--json", json.dumps(transfer())).strip()
    run("cancel", made, "--reason", "leak test")
    run("show", str(uuid.uuid4()), code=1)  # an error line
    run("enqueue", "/no.Such/Method", "--json", "{}", code=1)


def test_cli_config_errors_never_carry_the_key(tmp_path, db_url) -> None:
    key_file = _write(tmp_path / "key", KEY + "\n", mode=0o644)
    config = _write(tmp_path / "outbox.toml", f'[recrypt]\napi_key_file = "{key_file}"\n')
    env = {"OUTBOX_DATABASE_URL": db_url, "RECRYPT_API_KEY": None, "OUTBOX_CONFIG": None}
    # `run` is the one command that reads the key (issue 12: the read-only ones never do)
    result = CliRunner().invoke(main, ["--config", str(config), "run"], env=env)
    assert result.exit_code == 1
    assert "api_key_file" in result.stderr
    assert_clean(result.stdout + result.stderr, KEY, where="a CLI config error")


# --------------------------------------------------------------------------- the wire


class Capture(grpc.ServerInterceptor):
    """Records each call's metadata; the handler records the raw request bytes."""

    def __init__(self) -> None:
        self.metadata: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        self.bodies: list[bytes] = []

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        self.metadata.append((details.method, tuple(details.invocation_metadata)))
        return continuation(details)

    def handler(self) -> grpc.GenericRpcHandler:
        capture = self

        class Raw(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
                def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
                    capture.bodies.append(request)
                    return b""  # an empty response message

                return grpc.unary_unary_rpc_method_handler(answer)  # raw bytes both ways

        return Raw()


@pytest.fixture
def capture() -> Iterator[tuple[Capture, str]]:
    recorder = Capture()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[recorder])
    server.add_generic_rpc_handlers([recorder.handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield recorder, f"127.0.0.1:{port}"
    server.stop(0).wait()


def test_the_key_travels_only_as_apikey_metadata(capture, catalog) -> None:
    recorder, target = capture
    client = GrpcClient(RecryptConfig(target=target, tls=False, deadline=5.0), KEY)
    try:
        transfer_method = catalog.submittable(TRANSFER)
        request = build_request(transfer_method, transfer(), str(uuid.uuid4()))
        check = catalog.method(MAINTENANCE_CHECK)
        answers = [
            client.call(transfer_method, request),
            client.call(check, check.request_class()),
        ]
    finally:
        client.close()
    assert [a.code for a in answers] == [C.OK, C.OK]
    assert [method for method, _ in recorder.metadata] == [TRANSFER, MAINTENANCE_CHECK]
    for _method, metadata in recorder.metadata:
        assert [value for name, value in metadata if name == "apikey"] == [KEY]
        others = [f"{name}={value}" for name, value in metadata if name != "apikey"]
        assert_clean(" ".join(others), KEY, where="other metadata")
    assert MEMO.encode() in recorder.bodies[0]  # the payload is in the body, as it must be
    for body in recorder.bodies:
        assert KEY.encode() not in body
    assert KEY not in repr(request)
