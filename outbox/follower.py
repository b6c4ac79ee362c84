"""Follow a long-lived server stream (order updates) and attach each update to its outbox row.

Why: a PlaceOrder row is ``committed`` once Recrypt accepted it, but what happened to the order
afterwards (filled, cancelled) only arrives on ``Market.StreamOrderUpdates``. Each update carries
the ``idempotency_key`` of the request that created the order, so the follower writes it into
that row's history, where ``outbox show KEY`` puts it next to the calls.

Reconnects follow the guide and SPEC §5 "Streams": a stream that ends with OK (load balancing,
system updates, every few days) is reopened at once; one that fails (UNAVAILABLE ``vgw-db``
during rollover, or anything else, UNAUTHENTICATED included) is reopened after exponential
backoff capped by ``Backoff.maximum`` (3 minutes in the default config). Waits are on the stop
event, never ``time.sleep``, so ``stop()`` is immediate. Everything is descriptor-driven: the
method, its request and its update messages are read through ``outbox.descriptors``.

Updates sent while no stream is open (between an end and the reconnect) are not replayed by
the stream; the row's own state is unaffected, only its history misses that line.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

import grpc
from google.protobuf import json_format
from google.protobuf import message as pb

from outbox.backoff import Backoff
from outbox.clock import utcnow
from outbox.descriptors import KEY_FIELD, Catalog, Method
from outbox.errors import BadRowError, ConfigError
from outbox.logs import describe_error, kv
from outbox.policy import Gate, decide
from outbox.store import HistoryLine, Store
from outbox.vocabulary import HistoryKind

log = logging.getLogger("outbox.follower")

ACCOUNT_FIELD = "account"
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


class StreamClient(Protocol):
    """What the follower needs from a client: ``GrpcClient.stream``."""

    def stream(self, method: Method, request: pb.Message) -> Any: ...


class StreamFollower:
    """One daemon thread per account, each holding one stream open for as long as it runs.

    ``client_factory`` is called at every (re)connect, so a client replaced by a reload
    (SIGHUP: new API key) is picked up by the next connection. Counters (``reconnects``,
    ``events``, ``recorded``, ``unmatched``, ``failures``) are for metrics and tests;
    ``wait_for`` blocks until a predicate over the follower holds.
    """

    def __init__(  # noqa: PLR0917 - the six collaborators read best in this order
        self,
        client_factory: Callable[[], StreamClient],
        catalog: Catalog,
        store: Store,
        accounts: Sequence[str],
        method_path: str,
        backoff: Backoff,
        *,
        clock: Callable[[], datetime] = utcnow,
        on_event: Callable[[str, pb.Message], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.method = _stream_method(catalog, method_path)
        self._client_factory = client_factory
        self._store = store
        self.accounts = tuple(accounts)
        self._backoff = backoff
        self._clock = clock
        self._on_event = on_event
        self._rng = rng or random.Random()
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._calls: dict[str, Any] = {}  # account -> live call, cancelled by stop()
        self._threads: list[threading.Thread] = []
        self.reconnects = 0
        self.events = 0
        self.recorded = 0
        self.unmatched = 0
        self.failures = 0

    # ---- lifecycle

    def start(self) -> None:
        """Start one daemon thread per account (once)."""
        if self._threads or self._stopping.is_set():
            raise RuntimeError("StreamFollower.start() may be called once, before stop()")
        for account in self.accounts:
            thread = threading.Thread(
                target=self._follow, args=(account,), name=f"stream:{account}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Cancel the live streams, wake any backoff wait, join; True if all threads ended.

        Safe to call twice and before ``start``.
        """
        self._stopping.set()
        with self._cond:
            calls = list(self._calls.values())
            self._cond.notify_all()
        for call in calls:
            call.cancel()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    @property
    def alive(self) -> int:
        """How many account threads are still running."""
        return sum(thread.is_alive() for thread in self._threads)

    def wait_for(self, predicate: Callable[[StreamFollower], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate(self)`` holds (re-checked whenever a counter changes)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)

    # ---- one account

    def _follow(self, account: str) -> None:
        """Open, drain, reconnect: at once after OK, after backoff after a failure."""
        failures = 0
        while not self._stopping.is_set():
            code, details, received = self._run_once(account)
            if self._stopping.is_set():
                break
            failures = 0 if code == grpc.StatusCode.OK or received else failures
            delay = 0.0
            if code != grpc.StatusCode.OK:
                failures += 1
                delay = self._backoff.delay(failures, self._rng)
                self._bump("failures")
            self._log_reconnect(account, code, details, delay)
            if self._stopping.wait(delay):
                break
            self._bump("reconnects")

    def _run_once(self, account: str) -> tuple[grpc.StatusCode, str, bool]:
        """One stream from open to end: (status code, details, whether any update arrived)."""
        received = False
        try:
            call = self._client_factory().stream(self.method, self._request(account))
            if not self._register(account, call):
                call.cancel()
                return grpc.StatusCode.CANCELLED, "stopping", received
            log.debug(kv("stream_open", account=account, method=self.method.path))
            for update in call:
                received = True
                self._handle(account, update)
        except grpc.RpcError as error:
            return error.code(), error.details() or "", received
        except Exception as exc:  # a bug (or on_event) must never end the thread silently
            log.error(kv("stream_error", account=account, error=describe_error(exc)))
            return grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}", received
        finally:
            with self._cond:
                self._calls.pop(account, None)
        return grpc.StatusCode.OK, "", received

    def _register(self, account: str, call: Any) -> bool:
        """Make ``call`` cancellable by ``stop()``; False if stop() already ran."""
        with self._cond:
            if self._stopping.is_set():
                return False
            self._calls[account] = call
            return True

    def _request(self, account: str) -> pb.Message:
        request = self.method.request_class()
        if ACCOUNT_FIELD in request.DESCRIPTOR.fields_by_name:
            setattr(request, ACCOUNT_FIELD, account)
        return request

    # ---- one update

    def _handle(self, account: str, update: pb.Message) -> None:
        self._bump("events")
        key = field_text(update, KEY_FIELD)
        status = field_text(update, "status")
        event = HistoryLine(
            kind=HistoryKind.STREAM,
            decision=_snake(update.DESCRIPTOR.name),
            code=status,
            message=describe(update),
        )
        try:
            matched = bool(key) and self._store.record_stream_event(key or "", event, self._clock())
        except Exception as exc:  # the database is down: keep the stream, lose only this line
            log.error(
                kv("stream_record_failed", account=account, key=key, error=describe_error(exc))
            )
            return
        self._bump("recorded" if matched else "unmatched")
        if matched:
            log.info(kv("stream_update", account=account, key=key, status=status))
        else:
            log.debug(kv("stream_update_unmatched", account=account, key=key, status=status))
        if self._on_event is not None:
            self._on_event(account, update)

    # ---- helpers

    def _bump(self, counter: str) -> None:
        with self._cond:
            setattr(self, counter, getattr(self, counter) + 1)
            self._cond.notify_all()

    def _log_reconnect(
        self, account: str, code: grpc.StatusCode, details: str, delay: float
    ) -> None:
        after = "ok" if code == grpc.StatusCode.OK else code.name
        fields: dict[str, Any] = {"account": account, "after": after, "delay": round(delay, 3)}
        if code == grpc.StatusCode.OK:
            log.info(kv("stream_reconnect", **fields))
            return
        gate = decide(code, details).gate
        level = logging.INFO if gate == Gate.ROLLOVER else logging.WARNING
        why = details or None
        if gate == Gate.UNAUTHENTICATED:
            why = "API key refused: check the key and its IP allow-list, then reload (SIGHUP)"
        log.log(level, kv("stream_reconnect", **fields, gate=gate.value, why=why))


def _stream_method(catalog: Catalog, path: str) -> Method:
    """The method to follow, or a ``ConfigError`` naming ``[streams] method``."""
    try:
        method = catalog.method(path)
    except BadRowError as exc:
        raise ConfigError(f"[streams] method: {exc}") from None
    if not method.server_streaming or method.client_streaming:
        raise ConfigError(
            f"[streams] method: {path} is not a server-streaming method (request -> stream); "
            "set it to one, e.g. /recrypt.market.v1.Market/StreamOrderUpdates"
        )
    return method


def field_text(msg: pb.Message, name: str) -> str | None:
    """A scalar field as text, read through the descriptor: enums by value name.

    None when the message has no such field or it is unset; message fields (e.g. a
    ``google.protobuf.Timestamp``) are rendered in their JSON mapping.
    """
    field = msg.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        return None
    value = getattr(msg, name)
    if _repeated(field):
        return json.dumps(json_format.MessageToDict(msg).get(field.json_name)) if value else None
    if field.enum_type is not None:
        found = field.enum_type.values_by_number.get(value)
        return str(found.name) if found is not None else str(value)
    if field.message_type is not None:
        if not msg.HasField(name):
            return None
        rendered: Any = json_format.MessageToDict(value)
        return rendered if isinstance(rendered, str) else json.dumps(rendered)
    text = str(value)
    return text or None


def describe(update: pb.Message) -> str:
    """``order o-12 ORDER_STATUS_FILLED filled 0.05 at 2026-…`` from whichever fields exist."""
    parts = []
    for label, name in (("order", "order_id"), ("", "status"), ("filled", "filled_quantity")):
        text = field_text(update, name)
        if text:
            parts.append(f"{label} {text}" if label else text)
    at = field_text(update, "at")
    if at:
        parts.append(f"at {at}")
    return " ".join(parts) or json.dumps(json_format.MessageToDict(update))


def _repeated(field: Any) -> bool:
    """``is_repeated`` on protobuf 6+; ``label`` (removed in upb 7) before it."""
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == field.LABEL_REPEATED)


def _snake(name: str) -> str:
    return _CAMEL.sub("_", name).lower()
