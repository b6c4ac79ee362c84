"""The Recrypt stand-in's gRPC server: ``Simulator`` (lifecycle, controls, observation) and
its handlers for unary calls, server streams and the refused client streams.

The server is built from a ``Catalog`` (descriptor-driven, no generated code), so it serves
the bundled model protos or any other proto directory. The model's methods get their business
logic from ``model``; any other submittable method is served generically: dedupe by key,
record it, answer the default response. Every row of the API guide's error table can be
produced with ``inject(Fault(...))``; ``ledger`` and ``calls`` say what took effect and what
was answered, and ``wait_for`` lets tests synchronise without sleeping.

Order of checks for every call: API key (UNAUTHENTICATED "Session key"), maintenance mode
(PERMISSION_DENIED), injected faults in injection order, then the method itself.
It must not import ``outbox.simulator.cli``.
"""

from __future__ import annotations

import hmac
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import partial
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import Message

from outbox.clock import utcnow
from outbox.descriptors import KEY_FIELD, Catalog, Method
from outbox.simulator.faults import Fault
from outbox.simulator.ledger import CallRecord, Ledger, LedgerEntry
from outbox.simulator.model import Logic, Model, Status, to_dict

OK = grpc.StatusCode.OK
DEFAULT_API_KEYS = ("test-key",)
MAINTENANCE_MESSAGE = "maintenance mode, see https://x.com/RecryptCS"
MAX_WORKERS = 32
HANG_POLL = 0.05  # seconds between checks of a hang Event for a stopping server


@dataclass
class _Outcome:
    code: grpc.StatusCode
    message: str = ""
    response: Message | None = None
    executed: bool = False


@dataclass
class _Subscriber:
    account: str
    pending: deque[Message] = field(default_factory=deque)
    end: tuple[grpc.StatusCode, str] | None = None


def _key_of(method: Method, request: Message) -> str | None:
    return str(getattr(request, KEY_FIELD)) if method.submittable else None


def _apikey(context: grpc.ServicerContext) -> str | None:
    return _metadata(context, "apikey")


def _metadata(context: grpc.ServicerContext, wanted: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == wanted:
            return str(value)
    return None


class Simulator:
    """The Recrypt stand-in: a real gRPC server on loopback. See the module docstring."""

    def __init__(
        self,
        catalog: Catalog | None = None,
        api_keys: Collection[str] = DEFAULT_API_KEYS,
        *,
        transfer_limit: Decimal = Decimal("10000"),
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.catalog = catalog if catalog is not None else Catalog.load()
        self._clock = clock or utcnow
        self._cond = threading.Condition(threading.RLock())
        self._api_keys = frozenset(api_keys)
        self._book = Ledger()
        self._faults: list[Fault] = []
        self._subscribers: list[_Subscriber] = []
        self._stopped = threading.Event()
        self._server: Any = None
        self._target = ""
        self._model = Model(self.catalog, Decimal(transfer_limit), self._clock, self._deliver)
        self._logic: dict[str, Logic] = self._model.logic

    @property
    def transfer_limit(self) -> Decimal:
        """The amount above which a Transfer answers FAILED_PRECONDITION (tests may set it)."""
        return self._model.transfer_limit

    @transfer_limit.setter
    def transfer_limit(self, limit: Decimal) -> None:
        self._model.transfer_limit = Decimal(limit)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, listen: str = "127.0.0.1:0", *, tls: tuple[bytes, bytes] | None = None) -> int:
        """Serve on ``listen`` (port 0: any free port) and return the bound port.

        ``tls`` is ``(certificate_chain_pem, private_key_pem)``; without it, plaintext.
        """
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._stopped.clear()  # a restart (same ledger) serves delays, hangs and streams again
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_WORKERS))
        server.add_generic_rpc_handlers(self._generic_handlers())
        if tls is None:
            port = server.add_insecure_port(listen)
        else:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
            port = server.add_secure_port(listen, creds)
        if not port:
            raise OSError(f"simulator cannot listen on {listen!r}")
        server.start()
        self._server = server
        self._target = f"{_connect_host(listen)}:{port}"
        return int(port)

    def stop(self, grace: float | None = 0) -> None:
        """Stop serving; open streams end and held (hung, delayed) calls are released.

        Safe to call twice or before ``start``.
        """
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()

    @property
    def target(self) -> str:
        """``host:port`` for a client channel, e.g. ``127.0.0.1:50051``."""
        if not self._target:
            raise RuntimeError("simulator not started")
        return self._target

    def __enter__(self) -> Simulator:
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- controls ----------------------------------------------------------------------------

    def api_keys(self) -> tuple[str, ...]:
        with self._cond:
            return tuple(sorted(self._api_keys))

    def set_api_keys(self, keys: Collection[str]) -> None:
        with self._cond:
            self._api_keys = frozenset(keys)

    def inject(self, fault: Fault) -> Fault:
        """Add ``fault`` after the others (first match wins); returns it to inspect ``hits``."""
        with self._cond:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()

    def set_maintenance(self, on: bool, message: str = MAINTENANCE_MESSAGE) -> None:
        """Maintenance mode: every call, MaintenanceCheck included, answers PERMISSION_DENIED."""
        with self._cond:
            self._model.maintenance = message if on else None

    def set_rollover(self, start: datetime | None, end: datetime | None, notice: str = "") -> None:
        """The rollover window MaintenanceCheck reports (``None, None``: none scheduled)."""
        if (start is None) != (end is None):
            raise ValueError("set_rollover needs both start and end, or neither")
        with self._cond:
            self._model.rollover = (start, end)
            self._model.notice = notice

    def end_streams(self, code: grpc.StatusCode = OK, message: str = "") -> None:
        """End every open stream with ``code`` (OK: the guide's graceful end; else a failure)."""
        with self._cond:
            for sub in self._subscribers:
                sub.end = (code, message)
            self._cond.notify_all()

    # -- observation -------------------------------------------------------------------------

    @property
    def ledger(self) -> list[LedgerEntry]:
        with self._cond:
            return list(self._book.entries)

    @property
    def calls(self) -> list[CallRecord]:
        with self._cond:
            return list(self._book.calls)

    @property
    def open_streams(self) -> int:
        with self._cond:
            return len(self._subscribers)

    def executions(self, key: str) -> int:
        """How many times ``key`` took effect; the simulator guarantees at most 1."""
        with self._cond:
            return self._book.executions(key)

    def executed_keys(self) -> set[str]:
        with self._cond:
            return self._book.executed_keys()

    def call_count(self, method: str | None = None, since: datetime | None = None) -> int:
        """Calls received for ``method`` (all: ``None``) at or after ``since`` (by the clock)."""
        with self._cond:
            return self._book.call_count(method, since)

    def balance(self, account: str, currency: str) -> Decimal:
        with self._cond:
            return self._model.balances.get((account, currency), Decimal(0))

    def wait_for(self, predicate: Callable[[Simulator], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate(self)`` holds (re-checked on every call and effect)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)

    # -- serving -----------------------------------------------------------------------------

    def _generic_handlers(self) -> list[Any]:
        by_service: dict[str, dict[str, Any]] = defaultdict(dict)
        for path, method in self.catalog.methods.items():
            service, _, name = path[1:].rpartition("/")
            by_service[service][name] = self._method_handler(method)
        return [grpc.method_handlers_generic_handler(s, h) for s, h in by_service.items()]

    def _method_handler(self, method: Method) -> Any:
        codec = {
            "request_deserializer": method.request_class.FromString,
            "response_serializer": method.response_class.SerializeToString,
        }
        if method.client_streaming:
            # No model method streams requests: answer UNIMPLEMENTED after the usual checks.
            factory = (
                grpc.stream_stream_rpc_method_handler
                if method.server_streaming
                else grpc.stream_unary_rpc_method_handler
            )
            return factory(partial(self._serve_client_stream, method), **codec)
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(
                partial(self._serve_stream, method), **codec
            )
        return grpc.unary_unary_rpc_method_handler(partial(self._serve_unary, method), **codec)

    def _serve_unary(
        self, method: Method, request: Message, context: grpc.ServicerContext
    ) -> Message:
        key = _key_of(method, request)
        outcome = self._unary_outcome(method, request, key, context)
        self._record_call(method.path, key, outcome, context)
        if outcome.code != OK:
            context.abort(outcome.code, outcome.message)
        assert outcome.response is not None
        return outcome.response

    def _unary_outcome(
        self,
        method: Method,
        request: Message,
        key: str | None,
        context: grpc.ServicerContext,
    ) -> _Outcome:
        try:
            self._gate(context)
            fault = self._take_fault(method.path, key)
            if fault is not None:
                return self._faulted(fault, method, request, key)
            return _Outcome(OK, response=self._execute(method, request, key), executed=bool(key))
        except Status as status:
            return _Outcome(status.code, status.message)

    def _faulted(self, fault: Fault, method: Method, request: Message, key: str | None) -> _Outcome:
        """Answer ``fault``; with ``execute``, the effect happens first (if it can)."""
        if fault.code == OK:
            self._hold(fault)
            return _Outcome(OK, response=self._execute(method, request, key), executed=bool(key))
        executed = False
        if fault.execute:
            try:
                self._execute(method, request, key)
                executed = bool(key)
            except Status:
                pass  # the effect was refused (duplicate key, bad request): still answer the fault
        self._hold(fault)
        return _Outcome(fault.code, fault.message, executed=executed)

    def _gate(self, context: grpc.ServicerContext) -> None:
        supplied = _apikey(context)
        with self._cond:
            keys, maintenance = self._api_keys, self._model.maintenance
        if supplied is None or not any(hmac.compare_digest(supplied, k) for k in keys):
            raise Status(grpc.StatusCode.UNAUTHENTICATED, "Session key")
        if maintenance is not None:
            raise Status(grpc.StatusCode.PERMISSION_DENIED, maintenance)

    def _take_fault(self, path: str, key: str | None) -> Fault | None:
        with self._cond:
            for fault in self._faults:
                if fault.matches(path, key):
                    fault.hits += 1
                    self._cond.notify_all()  # tests wait on hits (a held call has arrived)
                    return fault
        return None

    def _hold(self, fault: Fault) -> None:
        """Delay and/or hang as the fault says; a stopping server releases it at once."""
        if fault.delay:
            self._stopped.wait(fault.delay)
        if fault.hang is not None:
            while not fault.hang.wait(HANG_POLL) and not self._stopped.is_set():
                pass

    def _execute(self, method: Method, request: Message, key: str | None) -> Message:
        logic = self._logic.get(method.path)
        if method.submittable:
            return self._execute_write(method, request, key or "", logic)
        if logic is None:
            raise Status(
                grpc.StatusCode.UNIMPLEMENTED, f"{method.path} is not implemented by the simulator"
            )
        with self._cond:
            return logic(request)

    def _execute_write(
        self,
        method: Method,
        request: Message,
        key: str,
        logic: Callable[[Message], Message] | None,
    ) -> Message:
        """Check the key, apply the effect and record it, all under one lock: never twice."""
        if not key:
            raise Status(grpc.StatusCode.INVALID_ARGUMENT, f"{KEY_FIELD} required")
        with self._cond:
            if self._book.has(key):
                raise Status(
                    grpc.StatusCode.ALREADY_EXISTS, f"{KEY_FIELD} already used; no changes made"
                )
            response = logic(request) if logic is not None else method.response_class()
            entry = LedgerEntry(
                key, method.path, to_dict(request), self._clock(), to_dict(response)
            )
            self._book.record(entry)
            self._cond.notify_all()
        return response

    def _record_call(
        self, path: str, key: str | None, outcome: _Outcome, context: grpc.ServicerContext
    ) -> None:
        had_apikey = _apikey(context) is not None
        record = CallRecord(
            path,
            key,
            outcome.code.name,
            self._clock(),
            had_apikey,
            outcome.executed,
            traceparent=_metadata(context, "traceparent"),
        )
        with self._cond:
            self._book.calls.append(record)
            self._cond.notify_all()

    def _serve_client_stream(
        self, method: Method, requests: Iterable[Message], context: grpc.ServicerContext
    ) -> Message:
        try:
            self._gate(context)
            outcome = _Outcome(grpc.StatusCode.UNIMPLEMENTED, f"{method.path} is not implemented")
        except Status as status:
            outcome = _Outcome(status.code, status.message)
        self._record_call(method.path, None, outcome, context)
        context.abort(outcome.code, outcome.message)
        raise AssertionError("unreachable: abort raises")

    # -- streams -----------------------------------------------------------------------------

    def _serve_stream(
        self, method: Method, request: Message, context: grpc.ServicerContext
    ) -> Iterator[Message]:
        try:
            self._stream_gate(method, context)
        except Status as status:
            self._record_call(method.path, None, _Outcome(status.code, status.message), context)
            context.abort(status.code, status.message)
        sub = _Subscriber(str(request.account))
        yield from self._stream_updates(sub, context)
        code, text = sub.end or (OK, "")
        if not context.is_active():
            code, text = grpc.StatusCode.CANCELLED, "client went away"
        self._record_call(method.path, None, _Outcome(code, text), context)
        if code != OK:
            context.abort(code, text)

    def _stream_gate(self, method: Method, context: grpc.ServicerContext) -> None:
        self._gate(context)
        fault = self._take_fault(method.path, None)
        if fault is not None:
            self._hold(fault)
            if fault.code != OK:
                raise Status(fault.code, fault.message)
        if method.path not in self._logic:
            raise Status(
                grpc.StatusCode.UNIMPLEMENTED, f"{method.path} is not implemented by the simulator"
            )

    def _stream_updates(self, sub: _Subscriber, context: grpc.ServicerContext) -> Iterator[Message]:
        """Yield ``sub``'s updates until ``end_streams``, ``stop`` or the client leaves."""
        context.add_callback(self._wake)
        with self._cond:
            self._subscribers.append(sub)
            self._cond.notify_all()
        try:
            while True:
                batch, done = self._next_updates(sub, context)
                yield from batch
                if done:
                    return
        finally:
            with self._cond:
                self._subscribers.remove(sub)
                self._cond.notify_all()

    def _next_updates(
        self, sub: _Subscriber, context: grpc.ServicerContext
    ) -> tuple[list[Message], bool]:
        def ready() -> bool:
            return bool(sub.pending) or self._finished(sub, context)

        with self._cond:
            self._cond.wait_for(ready, timeout=1.0)
            batch = list(sub.pending)
            sub.pending.clear()
            return batch, self._finished(sub, context)

    def _finished(self, sub: _Subscriber, context: grpc.ServicerContext) -> bool:
        return sub.end is not None or self._stopped.is_set() or not context.is_active()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _deliver(self, account: str, update: Message) -> None:
        """Queue ``update`` for the account's subscribers (the model calls it, lock held)."""
        for sub in self._subscribers:
            if sub.account == account:
                sub.pending.append(update)
        self._cond.notify_all()


def _connect_host(listen: str) -> str:
    """Where a local client reaches a server bound to ``listen`` (wildcards: loopback)."""
    host = listen.rpartition(":")[0]
    return "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::", "*") else host  # noqa: S104
