"""Tracing: an OpenTelemetry span per send attempt, in the writer's trace, and one per operator
action (README, "Tracing"). The only module of the outbox that imports ``opentelemetry`` (an
import-linter contract in pyproject.toml says so), and only inside functions: without the
``otel`` extra everything here is a no-op and nothing of OpenTelemetry is loaded.

Tracing is ON when all of these hold, else ``Tracing()`` (``on`` False: the dispatcher checks
that once per batch and does no other work):

- the ``otel`` extra is installed (the API, the SDK and an exporter);
- ``OTEL_SDK_DISABLED`` is not ``true``;
- ``OTEL_TRACES_EXPORTER`` names an exporter other than ``none`` (``otlp``, ``console``, or any
  installed ``opentelemetry_traces_exporter`` entry point), or, with it unset, an OTLP endpoint
  is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``).

So installing the extra alone never makes the daemon export to a default endpoint nobody
listens on. Everything else is read by the SDK itself, from the standard variables: the
exporter's endpoint, headers, certificates, timeout (``OTEL_EXPORTER_OTLP_*``), the sampler
(``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``), the batch processor (``OTEL_BSP_*``),
the resource (``OTEL_SERVICE_NAME``, default ``recrypt-outbox``, ``OTEL_RESOURCE_ATTRIBUTES``).

A row's stored ``traceparent`` is untrusted text: the W3C propagator parses it; anything it
does not accept gives the attempt a new root trace, never an error. What goes to Recrypt is the
attempt span's own ``traceparent``, never the stored text. Spans carry ids, the key, codes and
names, never a payload, a reference, a message text or the API key.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import cache
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import TYPE_CHECKING, Any, Protocol

from outbox.errors import BadRowError
from outbox.logs import kv
from outbox.operations import ActionTrace
from outbox.payload import check_key
from outbox.vocabulary import SpanEvent

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

log = logging.getLogger("outbox.tracing")

SERVICE_NAME = "recrypt-outbox"  # the resource's service.name unless OTEL_SERVICE_NAME says
DISTRIBUTION = "recrypt-outbox"
TRACER_NAME = "outbox"
EXTRA_HINT = "pip install 'recrypt-outbox[otel]'"
CLOSE_SECONDS = 5.0  # how long a stop waits for the last spans to be exported
EXPORTERS_GROUP = "opentelemetry_traces_exporter"  # the SDK's entry points for exporters
#: OTEL_TRACES_EXPORTER=otlp means the exporter of the OTLP protocol configured (grpc default).
OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}

#: Extra gRPC metadata for one call: this attempt's ``traceparent`` (and ``tracestate``).
Metadata = tuple[tuple[str, str], ...]


class Row(Protocol):
    """What an attempt's span reads of a claimed row (``outbox.store.Claim``)."""

    @property
    def id(self) -> int: ...
    @property
    def idempotency_key(self) -> Any: ...
    @property
    def attempts(self) -> int: ...
    @property
    def traceparent(self) -> Any: ...


# ---- the writer's side


@cache
def _w3c() -> tuple[Any, Any] | None:
    """The API's trace module and the W3C propagator; None without the API (imported once)."""
    try:
        from opentelemetry import trace  # noqa: PLC0415 (only when a writer enqueues)
        from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
            TraceContextTextMapPropagator,
        )
    except ImportError:
        return None
    return trace, TraceContextTextMapPropagator()


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the caller's current span (``outbox.enqueue`` stores it);
    None without the opentelemetry API or without a valid current span."""
    found = _w3c()
    if found is None:
        return None
    trace, w3c = found
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    w3c.inject(carrier)  # the current context: the caller's span
    return carrier.get("traceparent")


# ---- the daemon's side: off


class Tracing:
    """Tracing off: nothing is made. Callers test ``on`` once per batch and skip the rest."""

    on = False

    def attempts(
        self, rows: Sequence[tuple[Row, str | None]], claimed_ns: int, worker: str
    ) -> dict[int, Attempt]:
        """One span per row about to be attempted, by row id (``path``: its method, None when
        the protos have no such method)."""
        return {}

    def action(self, action: ActionTrace) -> AbstractContextManager[object]:
        """A span around one operator action (``outbox.operations.ActionScope``)."""
        return nullcontext()

    def retarget(self, target: str) -> None:
        """The Recrypt target the spans name as ``server.address`` and ``server.port``."""

    def close(self) -> None:
        """Export what is buffered and stop (the daemon's stop)."""


class Attempt:
    """One send attempt's span: CLIENT kind, OpenTelemetry's RPC conventions for gRPC."""

    __slots__ = ("metadata", "span")

    def __init__(self, span: Span, metadata: Metadata) -> None:
        self.span = span
        self.metadata = metadata  # sent with the call: names this span, never the row's text

    def answered(self, code: int, name: str, started: bool) -> None:
        """The call's status code; any code but OK is an error (gRPC's client convention)."""
        self.span.set_attribute("rpc.grpc.status_code", code)
        if not started:
            self.span.set_attribute("outbox.call.started", False)
        if code != 0:
            self.span.set_status(_error(name))

    def unsent(self, reason: str) -> None:
        """No call was made: the row could not be sent (``bad_row``, ``key_reused``, …)."""
        self.span.set_status(_error(reason))

    def event(self, name: SpanEvent, attributes: Mapping[str, str] | None = None) -> None:
        self.span.add_event(name, attributes)

    def end(self, name: SpanEvent, attributes: Mapping[str, str] | None = None) -> None:
        """The last event, then the end: this attempt's answer is durable (or cannot be)."""
        self.span.add_event(name, attributes)
        self.span.end()


def _error(description: str) -> Any:
    from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415 (loaded by then)

    return Status(StatusCode.ERROR, description)


# ---- the daemon's side: on


class _Otel(Tracing):
    """Tracing on, with ``provider``'s tracer (``owned``: this object shuts it down)."""

    on = True

    def __init__(self, provider: TracerProvider, *, owned: bool) -> None:
        from opentelemetry import trace  # noqa: PLC0415
        from opentelemetry.context import Context  # noqa: PLC0415
        from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
            TraceContextTextMapPropagator,
        )

        self._provider, self._owned = provider, owned
        self._tracer = provider.get_tracer(TRACER_NAME, _version())
        self._trace, self._w3c, self._root = trace, TraceContextTextMapPropagator(), Context()
        self._server: dict[str, str | int] = {}

    def retarget(self, target: str) -> None:
        self._server = server_attributes(target)

    def attempts(
        self, rows: Sequence[tuple[Row, str | None]], claimed_ns: int, worker: str
    ) -> dict[int, Attempt]:
        return {row.id: self._attempt(row, path, claimed_ns, worker) for row, path in rows}

    def _attempt(self, row: Row, path: str | None, claimed_ns: int, worker: str) -> Attempt:
        service, _, method = (path or "/unknown/unknown")[1:].rpartition("/")
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            **self._server,
            "outbox.row.id": row.id,
            "outbox.attempt": row.attempts + 1,
        }
        key = _shown_key(row.idempotency_key)
        if key is not None:
            attributes["messaging.message.id"] = key
        span = self._tracer.start_span(
            f"{service}/{method}",
            context=self.parent(row.traceparent),
            kind=self._trace.SpanKind.CLIENT,
            attributes=attributes,
            start_time=claimed_ns,
        )
        span.add_event(SpanEvent.CLAIMED, {"outbox.worker.id": worker}, timestamp=claimed_ns)
        carrier: dict[str, str] = {}
        self._w3c.inject(carrier, context=self._trace.set_span_in_context(span))
        return Attempt(span, tuple(carrier.items()))

    def parent(self, stored: object) -> Context:
        """The writer's context from a stored traceparent; an empty one (a new root) for
        anything the W3C propagator does not accept. Never raises."""
        if not isinstance(stored, str) or not stored:
            return self._root
        try:
            return self._w3c.extract({"traceparent": stored})
        except Exception:  # untrusted text: whatever it is, the row is sent in a new trace
            return self._root

    @contextmanager
    def _action(self, action: ActionTrace) -> Iterator[None]:
        attributes = {
            "outbox.action": action.action,
            "outbox.actor": action.actor,
            "outbox.selection": list(action.selection),
        }
        kind = self._trace.SpanKind.INTERNAL
        with self._tracer.start_as_current_span(
            f"outbox {action.action}",
            kind=kind,
            attributes=attributes,
            record_exception=False,  # an exception's text may quote a value: its type only
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except Exception as exc:
                span.set_status(_error(type(exc).__name__))
                raise
            finally:
                span.set_attributes({f"outbox.rows.{k}": n for k, n in action.counts.items()})

    def action(self, action: ActionTrace) -> AbstractContextManager[object]:
        return self._action(action)

    def close(self) -> None:
        """Export what is buffered, for at most ``CLOSE_SECONDS`` (a collector that is away
        must not hold up the daemon's stop), then stop the provider if it is ours."""
        done = self._provider.shutdown if self._owned else self._provider.force_flush
        closing = threading.Thread(target=done, name="outbox-tracing-close", daemon=True)
        closing.start()
        closing.join(CLOSE_SECONDS)


def _shown_key(key: object) -> str | None:
    """The row's key as a span names it: only a key (a canonical UUID). The column is the
    writer's text: a bad row's may hold anything, of any length, and is parked, not shown."""
    try:
        return check_key(key)
    except BadRowError:
        return None


def server_attributes(target: str) -> dict[str, str | int]:
    """``server.address`` and ``server.port`` of a ``host:port`` target (IPv6 in brackets)."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return {"server.address": target} if target else {}
    return {"server.address": host.strip("[]"), "server.port": int(port)}


# ---- configuration


def configured(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces (see the module's docstring)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if names:
        return names != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def from_env(env: Mapping[str, str] = os.environ) -> Tracing:
    """Tracing as the ``OTEL_*`` variables say: on with the SDK, else the no-op."""
    if not configured(env):
        return Tracing()
    try:
        provider = provider_from_env(env)
    except ImportError as exc:
        log.warning(kv("tracing_off", missing=exc.name, then=f"no spans; {EXTRA_HINT}"))
        return Tracing()
    return _Otel(provider, owned=True) if provider is not None else Tracing()


def with_provider(provider: TracerProvider) -> Tracing:
    """Tracing on ``provider`` (tests, or a program that embeds the daemon with its own);
    ``close`` flushes it but leaves it running."""
    return _Otel(provider, owned=False)


def provider_from_env(env: Mapping[str, str] = os.environ) -> TracerProvider | None:
    """The SDK's provider (its sampler from ``OTEL_TRACES_SAMPLER``) with a batch processor
    (``OTEL_BSP_*``) per exporter ``OTEL_TRACES_EXPORTER`` names; None when none loads."""
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    exporters = [e for e in map(_exporter, exporter_names(env)) if e is not None]
    if not exporters:
        return None
    provider = TracerProvider(resource=_resource())
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """The entry-point names of the exporters (``otlp``: per ``OTEL_EXPORTER_OTLP_PROTOCOL``)."""
    listed = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    names = [n.strip() for n in listed.split(",") if n.strip() and n.strip() != "none"]
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    ) or "grpc"
    otlp = OTLP_BY_PROTOCOL.get(protocol.strip(), f"otlp ({protocol.strip()})")
    return [otlp if n == "otlp" else n for n in names]


def _exporter(name: str) -> SpanExporter | None:
    """The exporter an entry point names, made with no arguments: it reads its own
    ``OTEL_EXPORTER_*`` variables. An unknown name is logged and left out."""
    found = entry_points(group=EXPORTERS_GROUP, name=name)
    if not found:
        log.error(
            kv(
                "tracing_exporter_unknown",
                exporter=name,
                then="left out; OTEL_TRACES_EXPORTER takes otlp, console or an installed "
                f"exporter's name ({EXTRA_HINT} installs OTLP over gRPC)",
            )
        )
        return None
    exporter: SpanExporter = next(iter(found)).load()()
    return exporter


def _resource() -> Any:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (the SDK reads them), with
    ``recrypt-outbox`` as the service's name unless they name it, and the outbox's version."""
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415

    found = Resource.create()
    if str(found.attributes.get("service.name", "")).startswith("unknown_service"):
        found = found.merge(Resource({"service.name": SERVICE_NAME}))
    return Resource({"service.version": _version()}).merge(found)


def _version() -> str:
    """The installed distribution's version (``outbox.__version__``, which this module, below
    the writer the package imports, cannot import)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


# ---- operator actions (the CLI and the console)


@cache
def process_tracing() -> Tracing:
    """This process's tracing from the environment, made at its first use."""
    return from_env()


def operator_action(action: ActionTrace) -> AbstractContextManager[object]:
    """The ``ActionScope`` the CLI gives its store (the console uses the same store)."""
    return process_tracing().action(action)
