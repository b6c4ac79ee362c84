"""A stand-in for the Recrypt gRPC API on loopback, with fault injection.

The server is built from a ``Catalog`` (descriptor-driven, no generated code), so it
serves the bundled model protos or any other proto directory. The model's methods have
small business logic (transfers, orders, an order-update stream, the maintenance check);
any other submittable method is served generically: dedupe by key, record it, answer the
default response. Every row of the API guide's error table can be produced with
``inject(Fault(...))``; ``ledger`` and ``calls`` say what took effect and what was answered,
and ``wait_for`` lets tests synchronise without sleeping.

Order of checks for every call: API key (UNAUTHENTICATED "Session key"), maintenance mode
(PERMISSION_DENIED), injected faults in injection order, then the method itself.
"""

from __future__ import annotations

import hmac
import os
import re
import signal
import sys
import threading
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from outbox.clock import utcnow
from outbox.descriptors import KEY_FIELD, Catalog, Method

OK = grpc.StatusCode.OK
DEFAULT_API_KEYS = ("test-key",)
MAINTENANCE_MESSAGE = "maintenance mode, see https://x.com/RecryptCS"
MAX_WORKERS = 32
HANG_POLL = 0.05  # seconds between checks of a hang Event for a stopping server

MAINTENANCE_CHECK = "/recrypt.core.v1.Core/MaintenanceCheck"
TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"
GET_BALANCES = "/recrypt.wallet.v1.Wallet/GetBalances"
PLACE_ORDER = "/recrypt.market.v1.Market/PlaceOrder"
CANCEL_ORDER = "/recrypt.market.v1.Market/CancelOrder"
STREAM_ORDER_UPDATES = "/recrypt.market.v1.Market/StreamOrderUpdates"

# Fields the business logic reads (request) and writes (response) per model method. A proto
# tree that serves the same path with other fields gets the generic behaviour instead.
_MODEL_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    MAINTENANCE_CHECK: (
        set(),
        {"maintenance_mode", "rollover_scheduled", "rollover_start", "rollover_end", "notice"},
    ),
    TRANSFER: (
        {"from_account", "to_account", "amount", "currency"},
        {"transfer_id", "executed_at"},
    ),
    GET_BALANCES: ({"account"}, {"balances"}),
    PLACE_ORDER: ({"account", "market", "type", "quantity", "limit_price"}, {"order_id", "status"}),
    CANCEL_ORDER: ({"account", "order_id"}, {"order_id", "status"}),
    STREAM_ORDER_UPDATES: (
        {"account"},
        {"order_id", "status", "filled_quantity", KEY_FIELD, "at"},
    ),
}

_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
_OPTION = re.compile(r"execute|x[0-9]+|delay=[0-9.]+", re.IGNORECASE)
SPEC_FORM = "CODE[:MESSAGE][@/pkg.Service/Method[,/pkg.Service/Method...]][:execute][:xN][:delay=S]"


@dataclass(eq=False)
class Fault:
    """An injected answer: the next matching calls get ``code``/``message`` instead of OK.

    ``execute`` performs the call's effect first and then answers the error (the guide's
    "executed, but the client got UNAVAILABLE vgw-db / DEADLINE_EXCEEDED"). ``methods`` and
    ``keys`` narrow which calls match (``None``: all). ``times`` limits the fault to the next
    N matching calls (``None``: until ``clear_faults``). ``delay`` (seconds) and ``hang``
    (blocks until set) hold the answer back, e.g. to run into a client deadline; with
    ``code=OK`` the call is only held back and then served normally.
    """

    code: grpc.StatusCode
    message: str = ""
    execute: bool = False
    methods: frozenset[str] | None = None
    keys: frozenset[str] | None = None
    times: int | None = None
    delay: float = 0.0
    hang: threading.Event | None = None
    hits: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.code, grpc.StatusCode):
            raise ValueError(f"Fault code must be a grpc.StatusCode, got {self.code!r}")
        if self.times is not None and self.times < 1:
            raise ValueError(
                f"Fault times must be at least 1 (or None for always), got {self.times}"
            )
        if self.delay < 0:
            raise ValueError(f"Fault delay must not be negative, got {self.delay}")

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, path: str, key: str | None) -> bool:
        if self.exhausted:
            return False
        if self.methods is not None and path not in self.methods:
            return False
        return self.keys is None or key in self.keys

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """A fault from the command line's ``--fault`` text.

        Grammar: ``CODE[:MESSAGE][@METHODS][:OPTION]...``

        - ``CODE``: a gRPC status code name, any case (``UNAVAILABLE``, ``failed_precondition``).
        - ``MESSAGE``: the status message; it may contain ``:`` and spaces.
        - ``METHODS``: full gRPC paths separated by ``,``; without them every method matches.
        - ``OPTION``: ``execute`` (perform the effect, then fail), ``xN`` (only the next N
          matching calls), ``delay=SECONDS`` (hold the answer back). Options are trailing
          ``:``-separated words, after the message or after the methods.

        Examples: ``UNAVAILABLE:vgw-db``, ``UNAVAILABLE:vgw-db:execute:x3``,
        ``FAILED_PRECONDITION:compliance question pending@/recrypt.wallet.v1.Wallet/Transfer``,
        ``RESOURCE_EXHAUSTED:100@/recrypt.market.v1.Market/PlaceOrder:x1``, ``OK:delay=2``.
        """
        body, options = _strip_options(spec.strip())
        body, _, methods_text = body.rpartition("@") if "@/" in body else (body, "", "")
        body, more_options = _strip_options(body)
        code_name, _, text = body.partition(":")
        code = _status_code(code_name, spec)
        fault = cls(
            code, text, methods=_parse_methods(methods_text, spec) if methods_text else None
        )
        for option in [*more_options, *options]:
            _apply_option(fault, option, spec)
        fault.__post_init__()
        return fault


def _spec_error(spec: str, problem: str) -> ValueError:
    return ValueError(
        f"bad fault spec {spec!r}: {problem}; expected {SPEC_FORM}, "
        "e.g. UNAVAILABLE:vgw-db:x3 or FAILED_PRECONDITION:limit@/recrypt.wallet.v1.Wallet/Transfer"
    )


def _strip_options(text: str) -> tuple[str, list[str]]:
    """Split trailing ``:option`` words off ``text``; returns the rest and the options."""
    options: list[str] = []
    while True:
        rest, sep, last = text.rpartition(":")
        if not sep or not _OPTION.fullmatch(last) or not rest:
            return text, options
        options.insert(0, last.lower())
        text = rest


def _status_code(name: str, spec: str) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[name.strip().upper()]
    except KeyError:
        raise _spec_error(spec, f"unknown gRPC code {name.strip()!r}") from None


def _parse_methods(text: str, spec: str) -> frozenset[str]:
    paths = [p.strip() for p in text.split(",")]
    for path in paths:
        if not re.fullmatch(r"/[^/\s]+/[^/\s]+", path):
            raise _spec_error(spec, f"method {path!r} is not a full gRPC path /pkg.Service/Method")
    return frozenset(paths)


def _apply_option(fault: Fault, option: str, spec: str) -> None:
    if option == "execute":
        fault.execute = True
    elif option.startswith("x"):
        fault.times = int(option[1:])
        if fault.times < 1:
            raise _spec_error(spec, "xN needs N of at least 1")
    else:
        try:
            fault.delay = float(option.removeprefix("delay="))
        except ValueError:
            raise _spec_error(spec, f"delay {option!r} is not a number of seconds") from None


@dataclass(frozen=True)
class LedgerEntry:
    """One write that took effect (at most one per idempotency key)."""

    key: str
    method: str
    request: dict[str, Any]
    at: datetime
    response: dict[str, Any]


@dataclass(frozen=True)
class CallRecord:
    """One call as received and answered; ``had_apikey`` only says whether a key was sent."""

    method: str
    key: str | None
    code: str
    at: datetime
    had_apikey: bool
    executed: bool = False


class _Status(Exception):
    """A non-OK answer decided while serving a call."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Outcome:
    code: grpc.StatusCode
    message: str = ""
    response: Message | None = None
    executed: bool = False


@dataclass
class _Order:
    account: str
    key: str
    quantity: str
    status: str  # OrderStatus value name, e.g. "ORDER_STATUS_OPEN"


@dataclass
class _Subscriber:
    account: str
    pending: deque[Message] = field(default_factory=deque)
    end: tuple[grpc.StatusCode, str] | None = None


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _to_dict(msg: Message) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return result


def _positive_decimal(text: str, name: str) -> Decimal:
    if not _DECIMAL.fullmatch(text) or Decimal(text) <= 0:
        raise _Status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{name} must be a positive decimal string such as '10.00', got {text!r}",
        )
    return Decimal(text)


def _required(value: str, name: str) -> str:
    if not value:
        raise _Status(grpc.StatusCode.INVALID_ARGUMENT, f"{name} required")
    return value


def _enum_number(msg: Message | type[Message], field_name: str, value: str) -> int:
    enum_type = msg.DESCRIPTOR.fields_by_name[field_name].enum_type
    number: int = enum_type.values_by_name[value].number
    return number


def _enum_name(msg: Message, field_name: str) -> str:
    enum_type = msg.DESCRIPTOR.fields_by_name[field_name].enum_type
    value = enum_type.values_by_number.get(getattr(msg, field_name))
    return str(value.name) if value is not None else ""


def _key_of(method: Method, request: Message) -> str | None:
    return str(getattr(request, KEY_FIELD)) if method.submittable else None


def _apikey(context: grpc.ServicerContext) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == "apikey":
            return str(value)
    return None


def _has_fields(msg_class: type[Message], names: set[str]) -> bool:
    return names <= set(msg_class.DESCRIPTOR.fields_by_name)


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
        self.transfer_limit = Decimal(transfer_limit)
        self._clock = clock or utcnow
        self._cond = threading.Condition(threading.RLock())
        self._api_keys = frozenset(api_keys)
        self._ledger: list[LedgerEntry] = []
        self._calls: list[CallRecord] = []
        self._executed: dict[str, int] = {}
        self._faults: list[Fault] = []
        self._balances: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        self._orders: dict[str, _Order] = {}
        self._subscribers: list[_Subscriber] = []
        self._maintenance: str | None = None
        self._rollover: tuple[datetime | None, datetime | None] = (None, None)
        self._notice = ""
        self._stopped = threading.Event()
        self._server: Any = None
        self._target = ""
        self._logic = self._model_logic()

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
            self._maintenance = message if on else None

    def set_rollover(self, start: datetime | None, end: datetime | None, notice: str = "") -> None:
        """The rollover window MaintenanceCheck reports (``None, None``: none scheduled)."""
        if (start is None) != (end is None):
            raise ValueError("set_rollover needs both start and end, or neither")
        with self._cond:
            self._rollover = (start, end)
            self._notice = notice

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
            return list(self._ledger)

    @property
    def calls(self) -> list[CallRecord]:
        with self._cond:
            return list(self._calls)

    @property
    def open_streams(self) -> int:
        with self._cond:
            return len(self._subscribers)

    def executions(self, key: str) -> int:
        """How many times ``key`` took effect; the simulator guarantees at most 1."""
        with self._cond:
            return self._executed.get(key, 0)

    def executed_keys(self) -> set[str]:
        with self._cond:
            return set(self._executed)

    def call_count(self, method: str | None = None, since: datetime | None = None) -> int:
        """Calls received for ``method`` (all: ``None``) at or after ``since`` (by the clock)."""
        with self._cond:
            return sum(
                1
                for c in self._calls
                if (method is None or c.method == method) and (since is None or c.at >= since)
            )

    def balance(self, account: str, currency: str) -> Decimal:
        with self._cond:
            return self._balances.get((account, currency), Decimal(0))

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
        except _Status as status:
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
            except _Status:
                pass  # the effect was refused (duplicate key, bad request): still answer the fault
        self._hold(fault)
        return _Outcome(fault.code, fault.message, executed=executed)

    def _gate(self, context: grpc.ServicerContext) -> None:
        supplied = _apikey(context)
        with self._cond:
            keys, maintenance = self._api_keys, self._maintenance
        if supplied is None or not any(hmac.compare_digest(supplied, k) for k in keys):
            raise _Status(grpc.StatusCode.UNAUTHENTICATED, "Session key")
        if maintenance is not None:
            raise _Status(grpc.StatusCode.PERMISSION_DENIED, maintenance)

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
            raise _Status(
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
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT, f"{KEY_FIELD} required")
        with self._cond:
            if key in self._executed:
                raise _Status(
                    grpc.StatusCode.ALREADY_EXISTS, f"{KEY_FIELD} already used; no changes made"
                )
            response = logic(request) if logic is not None else method.response_class()
            self._executed[key] = self._executed.get(key, 0) + 1
            entry = LedgerEntry(
                key, method.path, _to_dict(request), self._clock(), _to_dict(response)
            )
            self._ledger.append(entry)
            self._cond.notify_all()
        return response

    def _record_call(
        self, path: str, key: str | None, outcome: _Outcome, context: grpc.ServicerContext
    ) -> None:
        had_apikey = _apikey(context) is not None
        record = CallRecord(
            path, key, outcome.code.name, self._clock(), had_apikey, outcome.executed
        )
        with self._cond:
            self._calls.append(record)
            self._cond.notify_all()

    def _serve_client_stream(
        self, method: Method, requests: Iterable[Message], context: grpc.ServicerContext
    ) -> Message:
        try:
            self._gate(context)
            outcome = _Outcome(grpc.StatusCode.UNIMPLEMENTED, f"{method.path} is not implemented")
        except _Status as status:
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
        except _Status as status:
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
                raise _Status(fault.code, fault.message)
        if method.path not in self._logic:
            raise _Status(
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

    def _publish(self, account: str, order_id: str, order: _Order, filled: str) -> None:
        """Queue an OrderUpdate for the account's subscribers (caller holds the lock)."""
        stream = self.catalog.methods.get(STREAM_ORDER_UPDATES)
        if stream is None or STREAM_ORDER_UPDATES not in self._logic:
            return
        update_class = stream.response_class
        update = update_class(order_id=order_id, filled_quantity=filled, at=_rfc3339(self._clock()))
        update.status = _enum_number(update_class, "status", order.status)
        setattr(update, KEY_FIELD, order.key)
        for sub in self._subscribers:
            if sub.account == account:
                sub.pending.append(update)
        self._cond.notify_all()

    # -- business logic of the model methods (called with the lock held) ---------------------

    def _model_logic(self) -> dict[str, Callable[[Message], Message]]:
        logic: dict[str, Callable[[Message], Message]] = {
            MAINTENANCE_CHECK: self._maintenance_check,
            TRANSFER: self._transfer,
            GET_BALANCES: self._get_balances,
            PLACE_ORDER: self._place_order,
            CANCEL_ORDER: self._cancel_order,
            STREAM_ORDER_UPDATES: lambda request: request,  # served by _serve_stream
        }
        return {path: fn for path, fn in logic.items() if self._fits_model(path)}

    def _fits_model(self, path: str) -> bool:
        method = self.catalog.methods.get(path)
        if method is None:
            return False
        request_fields, response_fields = _MODEL_FIELDS[path]
        return _has_fields(method.request_class, request_fields) and _has_fields(
            method.response_class, response_fields
        )

    def _response(self, path: str, **fields: Any) -> Message:
        return self.catalog.methods[path].response_class(**fields)

    def _maintenance_check(self, request: Message) -> Message:
        start, end = self._rollover
        return self._response(
            MAINTENANCE_CHECK,
            maintenance_mode=self._maintenance is not None,
            rollover_scheduled=start is not None,
            rollover_start=_rfc3339(start) if start else "",
            rollover_end=_rfc3339(end) if end else "",
            notice=self._notice,
        )

    def _transfer(self, request: Message) -> Message:
        source = _required(request.from_account, "from_account")
        target = _required(request.to_account, "to_account")
        amount = _positive_decimal(request.amount, "amount")
        if amount > self.transfer_limit:
            raise _Status(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"transaction limit exceeded: amount {amount} is over the account's limit of "
                f"{self.transfer_limit}; ask Recrypt support to raise the limit",
            )
        currency = str(request.currency)
        self._balances[(source, currency)] -= amount
        self._balances[(target, currency)] += amount
        return self._response(
            TRANSFER, transfer_id=str(uuid.uuid4()), executed_at=_rfc3339(self._clock())
        )

    def _get_balances(self, request: Message) -> Message:
        response = self._response(GET_BALANCES)
        for (account, currency), amount in sorted(self._balances.items()):
            if account == request.account:
                response.balances.add(currency=currency, amount=str(amount))
        return response

    def _place_order(self, request: Message) -> Message:
        account = _required(request.account, "account")
        _required(request.market, "market")
        quantity = str(_positive_decimal(request.quantity, "quantity"))
        market_order = request.type == _enum_number(request, "type", "ORDER_TYPE_MARKET")
        if not market_order:
            _positive_decimal(request.limit_price, "limit_price")
        status = "ORDER_STATUS_FILLED" if market_order else "ORDER_STATUS_OPEN"
        order_id = str(uuid.uuid4())
        order = _Order(account, str(getattr(request, KEY_FIELD)), quantity, status)
        self._orders[order_id] = order
        self._publish(account, order_id, order, quantity if market_order else "0")
        response = self._response(PLACE_ORDER, order_id=order_id)
        response.status = _enum_number(response, "status", status)
        return response

    def _cancel_order(self, request: Message) -> Message:
        order = self._orders.get(request.order_id)
        open_here = order is not None and order.status == "ORDER_STATUS_OPEN"
        if order is None or not open_here or request.account not in ("", order.account):
            raise _Status(
                grpc.StatusCode.FAILED_PRECONDITION, f"order not open: {request.order_id!r}"
            )
        order.status = "ORDER_STATUS_CANCELLED"
        self._publish(order.account, request.order_id, order, "0")
        response = self._response(CANCEL_ORDER, order_id=request.order_id)
        response.status = _enum_number(response, "status", order.status)
        return response


def _connect_host(listen: str) -> str:
    """Where a local client reaches a server bound to ``listen`` (wildcards: loopback)."""
    host = listen.rpartition(":")[0]
    return "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::", "*") else host  # noqa: S104


@dataclass(frozen=True)
class Control:
    """What one read of the control file sets."""

    faults: tuple[Fault, ...] = ()
    maintenance: bool = False
    rollover: tuple[datetime | None, datetime | None] = (None, None)
    keys: tuple[str, ...] | None = None  # None: the keys given at start
    lines: int = 0

    @classmethod
    def parse(cls, text: str, where: str) -> Control:
        """The grammar ``outbox simulator --help`` shows; a bad line raises ``ValueError``
        naming it."""
        found: dict[str, Any] = {"faults": []}
        lines = 0
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                _control_line(line, found)
            except ValueError as exc:
                raise ValueError(f"{where} line {number}: {exc}") from None
            lines += 1
        return cls(tuple(found.pop("faults")), lines=lines, **found)


def _control_line(line: str, found: dict[str, Any]) -> None:
    word, _, rest = line.partition(" ")
    rest = rest.strip()
    if word == "fault":
        found["faults"].append(Fault.parse(rest))
    elif word == "maintenance" and rest in ("on", "off"):
        found["maintenance"] = rest == "on"
    elif word == "rollover":
        found["rollover"] = _window(rest)
    elif word == "keys" and rest:
        found["keys"] = tuple(k.strip() for k in rest.split(",") if k.strip())
    else:
        raise ValueError(
            f"cannot read {line!r}; expected fault SPEC, maintenance on|off, "
            "rollover START END or keys KEY[,KEY...]"
        )


def _window(text: str) -> tuple[datetime, datetime]:
    parts = text.split()
    try:
        start, end = (datetime.fromisoformat(p).astimezone(UTC) for p in parts)
    except ValueError:
        raise ValueError(
            f"rollover {text!r}: expected two ISO 8601 UTC times, e.g. "
            "rollover 2030-01-01T18:00:00Z 2030-01-01T18:30:00Z"
        ) from None
    return start, end


class ControlFile:
    """Re-read a control file when it changes and apply it to a running simulator."""

    def __init__(self, path: str | os.PathLike[str], sim: Simulator) -> None:
        self.path = Path(path)
        self._sim = sim
        self._keys = sim.api_keys()
        self._seen: tuple[float, int] | None = None

    def poll(self) -> str | None:
        """Apply the file if it changed; returns what to report (None: nothing new)."""
        try:
            stat = self.path.stat()
        except OSError as exc:
            return None if self._seen == (-1, -1) else self._missing(exc)
        if self._seen == (stat.st_mtime, stat.st_size):
            return None
        self._seen = (stat.st_mtime, stat.st_size)
        try:
            control = Control.parse(self.path.read_text(encoding="utf-8"), str(self.path))
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            return f"{exc}; keeping the previous settings"
        self._apply(control)
        return f"applied {control.lines} line" + ("" if control.lines == 1 else "s")

    def _missing(self, exc: OSError) -> str:
        self._seen = (-1, -1)
        return f"{self.path}: {exc.strerror}; keeping the previous settings"

    def _apply(self, control: Control) -> None:
        sim = self._sim
        sim.clear_faults()
        for fault in control.faults:
            sim.inject(fault)
        sim.set_maintenance(control.maintenance)
        sim.set_rollover(*control.rollover)
        sim.set_api_keys(control.keys if control.keys is not None else self._keys)


def main_serve(
    listen: str,
    api_keys: list[str],
    faults: list[str],
    transfer_limit: str,
    proto_path: str | None,
    *,
    control: str | None = None,
) -> None:
    """``outbox simulator``: serve until SIGINT/SIGTERM, then stop cleanly; with ``control``,
    apply that file (``ControlFile``) at start and whenever it changes.

    ``api_keys`` empty means the default test key. ``faults`` are ``Fault.parse`` specs;
    a bad spec or limit raises ``ValueError`` before anything listens.
    """
    parsed = [Fault.parse(spec) for spec in faults]
    try:
        limit = _positive_decimal(transfer_limit, "transfer limit")
    except _Status as exc:
        raise ValueError(exc.message) from None
    sim = Simulator(Catalog.load(proto_path), api_keys or DEFAULT_API_KEYS, transfer_limit=limit)
    for fault in parsed:
        sim.inject(fault)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        port = sim.start(listen)
        host = listen.rpartition(":")[0] or "0.0.0.0"  # noqa: S104
        sys.stderr.write(f"simulator listening on {host}:{port} (plaintext)\n")
        sys.stderr.flush()
        watcher = ControlFile(control, sim) if control else None
        while True:
            said = watcher.poll() if watcher else None
            if said:
                sys.stderr.write(f"simulator control: {said}\n")
                sys.stderr.flush()
            if stop.wait(0.5):
                break
    finally:
        sim.stop(grace=1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
