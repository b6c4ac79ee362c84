"""Tracing (issue 15): a span per send attempt in the writer's trace, the attempt's
``traceparent`` sent to Recrypt, span events, operator actions' spans, and tracing off
without the ``otel`` extra.

A real daemon on SQLite against the simulator (which records the ``traceparent`` each call
carried); spans go to the SDK's in-memory exporter through a provider injected into the
daemon's ``Tracing`` (never the global provider).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy.engine import Engine

import outbox
from outbox import tracing
from outbox.cli.actions import default_actor
from outbox.daemon import Daemon
from outbox.filters import RowFilter
from outbox.schema import messages
from outbox.simulator import TRANSFER, Fault, Simulator
from outbox.store import Store
from tests.integration.test_cli import Cli, park
from tests.integration.test_daemon import KEY, daemon_for
from tests.integration.test_latency_metrics import due_now
from tests.integration.test_monitoring import HIDE_HISTORY, SHOW_HISTORY, run_job

C = grpc.StatusCode
REFERENCE = "invoice-REF-7731"
PAYLOAD = {"fromAccount": "acct-FROM-5521", "toAccount": "acct-TO-8830", "amount": "4321.09"}
SECRETS = (KEY, REFERENCE, *PAYLOAD.values())
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
SPAN_NAME = TRANSFER[1:]  # recrypt.wallet.v1.Wallet/Transfer


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    made = TracerProvider(shutdown_on_exit=False)  # the test's own: never the global one
    yield made
    made.shutdown()


@pytest.fixture
def exported(provider: TracerProvider) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(api_keys=[KEY]) as simulator:
        yield simulator


@pytest.fixture
def daemon(
    sqlite_url: str, sim: Simulator, provider: TracerProvider, exported: InMemorySpanExporter
) -> Iterator[Daemon]:
    made = daemon_for(sqlite_url, sim.target, tracing=tracing.with_provider(provider))
    yield made
    made.engine.dispose()


def enqueue(engine: Engine, provider: TracerProvider | None = None) -> tuple[str, int | None]:
    """A row enqueued inside the writer's span (``provider``: else outside any span); its key
    and the writer span's id."""
    with engine.begin() as conn:
        if provider is None:
            return outbox.enqueue(conn, TRANSFER, PAYLOAD, reference=REFERENCE), None
        with provider.get_tracer("writer").start_as_current_span("checkout") as span:
            key = outbox.enqueue(conn, TRANSFER, PAYLOAD, reference=REFERENCE)
            return key, span.get_span_context().span_id


def attempts(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == SPAN_NAME]


def sent_traceparents(sim: Simulator) -> list[str | None]:
    return [c.traceparent for c in sim.calls if c.method == TRANSFER]


def names(span: ReadableSpan) -> tuple[int, int]:
    """(trace id, span id) as the W3C traceparent writes them."""
    return span.context.trace_id, span.context.span_id


def w3c(span: ReadableSpan) -> str:
    trace_id, span_id = names(span)
    return f"00-{trace_id:032x}-{span_id:016x}-{span.context.trace_flags:02x}"


def events(span: ReadableSpan) -> list[tuple[str, dict[str, object]]]:
    return [(e.name, dict(e.attributes or {})) for e in span.events]


def test_a_row_enqueued_inside_a_span_is_sent_in_that_trace(
    daemon: Daemon, sim: Simulator, exported: InMemorySpanExporter, provider: TracerProvider
) -> None:
    key, writer_span = enqueue(daemon.engine, provider)
    (writer,) = [s for s in exported.get_finished_spans() if s.name == "checkout"]
    with daemon.engine.connect() as conn:
        stored = conn.scalar(sa.select(messages.c.traceparent))
    assert stored == w3c(writer)  # the writer's span, as the column keeps it

    run_job(daemon, "dispatch")

    (attempt,) = attempts(exported)
    assert attempt.parent is not None and attempt.parent.span_id == writer_span
    assert attempt.context.trace_id == writer.context.trace_id
    assert attempt.kind == SpanKind.CLIENT
    assert attempt.status.status_code == StatusCode.UNSET
    assert dict(attempt.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "recrypt.wallet.v1.Wallet",
        "rpc.method": "Transfer",
        "server.address": "127.0.0.1",
        "server.port": int(sim.target.rpartition(":")[2]),
        "outbox.row.id": 1,
        "messaging.message.id": key,
        "outbox.attempt": 1,
        "rpc.grpc.status_code": 0,
    }
    assert sent_traceparents(sim) == [w3c(attempt)]  # the attempt's, not the writer's


def test_a_retried_row_makes_one_span_per_attempt_in_the_same_trace(
    daemon: Daemon, sim: Simulator, exported: InMemorySpanExporter, provider: TracerProvider
) -> None:
    key, writer_span = enqueue(daemon.engine, provider)
    sim.inject(Fault(C.UNAVAILABLE, "try again", times=1))
    run_job(daemon, "dispatch")
    due_now(daemon.engine, key)
    run_job(daemon, "dispatch")

    first, second = attempts(exported)
    assert sim.executions(key) == 1
    assert first.context.trace_id == second.context.trace_id
    assert first.context.span_id != second.context.span_id
    assert first.parent is not None and first.parent.span_id == writer_span
    assert second.parent is not None and second.parent.span_id == writer_span
    assert (first.attributes or {})["rpc.grpc.status_code"] == C.UNAVAILABLE.value[0]
    assert first.status.status_code == StatusCode.ERROR
    assert (second.attributes or {})["rpc.grpc.status_code"] == 0
    assert [(s.attributes or {})["outbox.attempt"] for s in (first, second)] == [1, 2]
    assert sent_traceparents(sim) == [w3c(first), w3c(second)]


EVENTS = {
    "committed": (None, [("claimed", None), ("recorded", "committed")]),
    "parked": (
        Fault(C.FAILED_PRECONDITION, "compliance"),
        [("claimed", None), ("parked", "precondition"), ("recorded", "parked")],
    ),
    "gate_changed": (
        Fault(C.UNAVAILABLE, "vgw-db"),
        [("claimed", None), ("gate_changed", "rollover"), ("recorded", "retry")],
    ),
}


@pytest.mark.parametrize("case", list(EVENTS))
def test_the_span_events_are_there_in_order(
    case: str, daemon: Daemon, sim: Simulator, exported: InMemorySpanExporter
) -> None:
    fault, expected = EVENTS[case]
    if fault is not None:
        sim.inject(fault)
    enqueue(daemon.engine)
    run_job(daemon, "dispatch")

    (attempt,) = attempts(exported)
    seen = events(attempt)
    said = {"parked": "outbox.park_reason", "gate_changed": "outbox.gate"}
    said |= {"recorded": "outbox.outcome"}
    assert [(n, a.get(said[n]) if n in said else None) for n, a in seen] == expected
    assert seen[0][1] == {"outbox.worker.id": daemon.worker_id}
    assert attempt.events[0].timestamp == attempt.start_time  # claimed: the claim's time
    assert attempt.end_time is not None and attempt.events[-1].timestamp <= attempt.end_time


def test_no_attribute_carries_the_payload_the_api_key_or_the_reference(
    daemon: Daemon, sim: Simulator, exported: InMemorySpanExporter, provider: TracerProvider
) -> None:
    sim.inject(Fault(C.FAILED_PRECONDITION, f"about {REFERENCE} {PAYLOAD['amount']}", times=1))
    enqueue(daemon.engine, provider)
    enqueue(daemon.engine, provider)
    run_job(daemon, "dispatch")

    spans = attempts(exported)
    assert len(spans) == 2
    values = [str(v) for s in spans for v in (s.attributes or {}).values()]
    values += [str(v) for s in spans for e in s.events for v in (e.attributes or {}).values()]
    values += [str(s.status.description) for s in spans]
    leaked = [(secret, v) for v in values for secret in SECRETS if secret in v]
    assert not leaked


def test_a_key_that_is_not_a_key_never_reaches_a_span(
    daemon: Daemon, exported: InMemorySpanExporter
) -> None:
    """The key column is the writer's text too: a span names the row's key only when it is
    one (a canonical UUID); anything else (here 5,000 characters of data) is left out."""
    text = "NOT-A-KEY-" + REFERENCE * 300
    with daemon.engine.begin() as conn:
        conn.execute(
            messages.insert().values(
                idempotency_key=text[:64] if daemon.engine.dialect.name != "sqlite" else text,
                method=TRANSFER,
                payload=PAYLOAD,
            )
        )
    run_job(daemon, "dispatch")

    (attempt,) = attempts(exported)
    attributes = dict(attempt.attributes or {})
    assert "messaging.message.id" not in attributes
    assert not [v for v in attributes.values() if "NOT-A-KEY" in str(v)]
    assert attempt.status.status_code == StatusCode.ERROR  # parked bad_row, no call


GARBAGE = {
    "text": "not a traceparent",
    "newline": "00-" + "a" * 32 + "\n-" + "b" * 16 + "-01",
    "non_ascii": "00-" + "é" * 32 + "-" + "b" * 16 + "-01",
    "too_long": "00-" + "f" * 125,
    "unknown_version": "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",
    "all_zero": "00-" + "0" * 32 + "-" + "0" * 16 + "-01",
}


@pytest.mark.parametrize("stored", list(GARBAGE.values()), ids=list(GARBAGE))
def test_a_stored_traceparent_that_is_none_is_sent_in_a_new_root_trace(
    stored: str, daemon: Daemon, sim: Simulator, exported: InMemorySpanExporter
) -> None:
    key, _ = enqueue(daemon.engine)
    with daemon.engine.begin() as conn:
        conn.execute(messages.update().values(traceparent=stored))

    run_job(daemon, "dispatch")

    assert sim.executions(key) == 1
    assert Store(daemon.engine).get(key).state == "committed"
    (attempt,) = attempts(exported)
    assert attempt.parent is None  # a new root trace
    (sent,) = sent_traceparents(sim)
    assert sent is not None and TRACEPARENT.match(sent) and sent == w3c(attempt)


def test_a_record_that_fails_ends_the_spans_saying_so(
    daemon: Daemon, sim: Simulator, exported: InMemorySpanExporter
) -> None:
    key, _ = enqueue(daemon.engine)
    with daemon.engine.begin() as conn:
        conn.exec_driver_sql(HIDE_HISTORY)
    run_job(daemon, "dispatch")  # sent; the record fails: the answer is kept in memory

    (attempt,) = attempts(exported)  # ended: no span is left open
    assert [n for n, _a in events(attempt)] == ["claimed", "record_failed"]
    assert events(attempt)[-1][1] == {"error.type": "OperationalError"}

    with daemon.engine.begin() as conn:
        conn.exec_driver_sql(SHOW_HISTORY)
    run_job(daemon, "dispatch")  # the kept answer is recorded now, without a second span
    assert Store(daemon.engine).get(key).state == "committed"
    assert len(attempts(exported)) == 1 and sim.executions(key) == 1


def test_an_operator_action_makes_its_own_span(
    sqlite_url: str,
    provider: TracerProvider,
    exported: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the CLI's store (the console is served the same one): filter names only."""
    monkeypatch.setattr(tracing, "process_tracing", lambda: tracing.with_provider(provider))
    cli = Cli(sqlite_url)
    store = Store(sa.create_engine(sqlite_url))
    keys = [cli.enqueue("--reference", REFERENCE) for _ in range(2)]
    for key in keys:
        park(store.engine, key, maybe_executed=False)

    wanted = ("--reference", REFERENCE, "--park-reason", "precondition")
    cli.invoke("requeue", *wanted, "--yes", "--reason", f"fixed {REFERENCE}")
    cli.invoke("hold", "lane", "lane-of-acct-FROM-5521", "--reason", "audit")

    requeue, hold = exported.get_finished_spans()
    assert (requeue.name, hold.name) == ("outbox requeue", "outbox hold")
    assert requeue.kind == hold.kind == SpanKind.INTERNAL
    attributes = dict(requeue.attributes or {})
    assert attributes.pop("outbox.actor") == default_actor()  # user@host
    assert attributes == {
        "outbox.action": "requeue",
        "outbox.selection": ("park_reason", "reference"),
        "outbox.rows.matched": 2,
        "outbox.rows.acted": 2,
        "outbox.rows.requested": 0,
        "outbox.rows.skipped": 0,
    }
    assert dict(hold.attributes or {})["outbox.selection"] == ("lane",)
    values = [str(v) for s in (requeue, hold) for v in (s.attributes or {}).values()]
    assert not [v for v in values if REFERENCE in v or "5521" in v]
    store.engine.dispose()


def test_a_refused_action_says_so_and_a_dry_run_makes_no_span(
    sqlite_url: str, provider: TracerProvider, exported: InMemorySpanExporter
) -> None:
    engine = sa.create_engine(sqlite_url)
    store = Store(engine, actions=tracing.with_provider(provider).action)
    key = outbox_row(engine)
    now = datetime.now(UTC)
    store.requeue_matching(RowFilter(state="parked"), "alice@console", "x", now, dry_run=True)
    with pytest.raises(outbox.OutboxError):
        store.requeue(key, "alice@console", "x", now)  # pending: not parked

    (refused,) = exported.get_finished_spans()
    assert refused.name == "outbox requeue"
    assert refused.status.status_code == StatusCode.ERROR
    assert refused.status.description == "OperatorActionError"
    assert "outbox.rows.acted" not in (refused.attributes or {})
    engine.dispose()


def test_hold_release_cancel_approve_and_reject_each_make_their_span(
    sqlite_url: str, provider: TracerProvider, exported: InMemorySpanExporter
) -> None:
    """Every other action, dual control included: its own span, who acted, no reason text."""
    engine = sa.create_engine(sqlite_url)
    store = Store(engine, actions=tracing.with_provider(provider).action)
    now = datetime.now(UTC)
    store.hold("lane", "lane-7", "alice@console", "WHY-hold", now)
    store.release("lane", "lane-7", "alice@console", "WHY-release")
    for verdict in (store.approve, store.reject):
        key = outbox_row(engine)
        park(engine, key, maybe_executed=True)
        store.cancel(key, "alice@console", "WHY-cancel", now, True, dual_control=True)
        (request,) = store.approvals()
        verdict(request.id, "bob@console", "WHY-verdict", now)

    spans = exported.get_finished_spans()
    assert [s.name for s in spans] == [
        f"outbox {a}" for a in ("hold", "release", "cancel", "approve", "cancel", "reject")
    ]
    assert all(s.kind == SpanKind.INTERNAL for s in spans)
    actors = [dict(s.attributes or {})["outbox.actor"] for s in spans]
    assert actors == ["alice@console"] * 3 + ["bob@console", "alice@console", "bob@console"]
    assert dict(spans[2].attributes or {})["outbox.rows.requested"] == 1  # a request, not done
    values = [str(v) for s in spans for v in (s.attributes or {}).values()]
    assert not [v for v in values if "WHY" in v or "lane-7" in v]
    engine.dispose()


def outbox_row(engine: Engine) -> str:
    with engine.begin() as conn:
        return outbox.enqueue(conn, TRANSFER, PAYLOAD)


WITHOUT_THE_EXTRA = """
import sys
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
import outbox
from outbox.simulator import TRANSFER, Simulator
from outbox.store import Store
from tests.integration.test_daemon import KEY, daemon_for
from tests.integration.test_monitoring import run_job

url = sys.argv[1]
with Simulator(api_keys=[KEY]) as sim:
    daemon = daemon_for(url, sim.target)  # OTEL_TRACES_EXPORTER asks; the extra is absent
    with daemon.engine.begin() as conn:
        key = outbox.enqueue(conn, TRANSFER, {"fromAccount": "a", "toAccount": "b", "amount": "1"})
    run_job(daemon, "dispatch")
    with daemon.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT traceparent FROM outbox_messages").scalar()
    loaded = sorted(m for m, v in sys.modules.items() if m.startswith("opentelemetry") and v)
    print(json.dumps({
        "on": daemon.tracing.on, "state": Store(daemon.engine).get(key).state,
        "stored": stored, "sent": [c.traceparent for c in sim.calls if c.method == TRANSFER],
        "loaded": loaded,
    }))
    daemon.engine.dispose()
"""


def test_without_the_extra_the_writer_and_the_daemon_work_and_tracing_is_off(
    sqlite_url: str,
) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "OTEL_TRACES_EXPORTER": "console"}
    script = "import json\n" + textwrap.dedent(WITHOUT_THE_EXTRA)
    done = subprocess.run(
        [sys.executable, "-c", script, sqlite_url],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {
        "on": False,
        "state": "committed",
        "stored": None,
        "sent": [None],
        "loaded": [],
    }
    assert "tracing_off" in done.stderr and "recrypt-outbox[otel]" in done.stderr
