"""The Recrypt client: one reused channel, the ``apikey`` metadata, deadlines, generic calls.

Calls are made through the descriptors (``outbox.descriptors``), never generated stubs, so the
customer's real ``.proto`` files work unchanged. ``RecryptClient`` is the protocol the dispatcher
depends on; ``GrpcClient`` is the one implementation, tested against the simulator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import message as pb

from outbox.config import RecryptConfig, is_loopback
from outbox.descriptors import Method
from outbox.errors import ConfigError

# Keep idle connections healthy through NATs and load balancers; gRPC's own defaults otherwise.
_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)


@dataclass(frozen=True)
class Answer:
    """What one call ended with: a status code, its message, and the response on OK.

    ``started`` is False only when the call provably never left this host (the channel was
    already closed when it was to start): such a row goes back untouched. Every other failure,
    a call cancelled mid-flight included, may have executed.
    """

    code: grpc.StatusCode
    message: str
    response: pb.Message | None
    duration_ms: float
    started: bool = True
    sent_at: float | None = None  # Unix time the call left (None: never started, or unknown)


class _NeverStarted:
    """A call that could not start: the channel was closed before it (a reload or a stop)."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def wait(self) -> Answer:
        return Answer(grpc.StatusCode.CANCELLED, self._reason, None, 0.0, started=False)


class PendingCall(Protocol):
    def wait(self) -> Answer: ...


#: Metadata sent with one call besides ``apikey`` (a trace context: ``outbox.tracing``).
Metadata = tuple[tuple[str, str], ...]


class RecryptClient(Protocol):
    def start(self, method: Method, request: pb.Message, metadata: Metadata = ()) -> PendingCall:
        """Start one call; ``metadata`` goes with it, after the ``apikey``."""
        ...

    def wait_ready(self, timeout: float) -> bool:
        """True once the channel has a connection (READY); False if none came in time."""
        ...

    def send_all(
        self,
        calls: Sequence[tuple[Method, pb.Message]],
        metadata: Sequence[Metadata] | None = None,
    ) -> list[Answer]:
        """Send a batch at once (all in flight together); answers in the same order.
        ``metadata``: one entry per call (None: none for any)."""
        ...

    def close(self) -> None: ...


class _GrpcPendingCall:
    def __init__(self, future: grpc.Future, started: float, sent_at: float) -> None:
        self._future = future
        self._started = started
        self._sent_at = sent_at

    def wait(self) -> Answer:
        try:
            response = self._future.result()
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            response = None
            code, details = error.code(), error.details() or ""
        elapsed = (time.perf_counter() - self._started) * 1000.0
        return Answer(code, details, response, elapsed, sent_at=self._sent_at)


class GrpcClient:
    """A thread-safe client over one channel; callables are cached per method path."""

    def __init__(self, config: RecryptConfig, api_key: str) -> None:
        _check_metadata_value(api_key)
        self._deadline = config.deadline
        self._metadata = (("apikey", api_key),)
        self._channel = open_channel(config)
        self._callables: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._state: grpc.ChannelConnectivity | None = None
        self._closed = False
        self._state_changed = threading.Condition()
        self._channel.subscribe(self._on_connectivity, try_to_connect=True)

    def __repr__(self) -> str:  # never show the metadata
        return f"GrpcClient(deadline={self._deadline})"

    def start(self, method: Method, request: pb.Message, metadata: Metadata = ()) -> PendingCall:
        started, sent_at = time.perf_counter(), time.time()
        sent = self._metadata + metadata if metadata else self._metadata
        try:
            call = self._callable(method)
            future = call.future(request, timeout=self._deadline, metadata=sent)
        except ValueError as exc:  # grpc: "Cannot invoke RPC on closed channel!"
            return _NeverStarted(f"not sent: {exc}")
        return _GrpcPendingCall(future, started, sent_at)

    def call(self, method: Method, request: pb.Message) -> Answer:
        return self.start(method, request).wait()

    def send_all(
        self,
        calls: Sequence[tuple[Method, pb.Message]],
        metadata: Sequence[Metadata] | None = None,
    ) -> list[Answer]:
        if metadata is None:
            pending = [self.start(method, request) for method, request in calls]
        else:
            extra = zip(calls, metadata, strict=True)
            pending = [self.start(method, request, more) for (method, request), more in extra]
        return [p.wait() for p in pending]

    def stream(self, method: Method, request: pb.Message) -> Any:
        """A server stream (no deadline: it is long-lived); iterate it, cancel() to stop."""
        multi = self._channel.unary_stream(
            method.path,
            request_serializer=method.request_class.SerializeToString,
            response_deserializer=method.response_class.FromString,
        )
        return multi(request, metadata=self._metadata)

    def wait_ready(self, timeout: float) -> bool:
        """Whether the channel is connected: waits up to ``timeout`` while it is connecting,
        and answers False at once when the last attempt to connect failed.

        The dispatcher starts calls only on a READY channel: a call that was never started
        provably never left this host. Once started, any failure may have executed, whatever
        its text says (a server can answer "failed to connect" too).
        """
        settled = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
        if self._closed:
            return False
        if self._state == grpc.ChannelConnectivity.IDLE:  # idle after a quiet spell: reconnect
            self._channel.subscribe(_poke, try_to_connect=True)
            self._channel.unsubscribe(_poke)
        with self._state_changed:
            self._state_changed.wait_for(lambda: self._state in settled, timeout)
            return bool(self._state == grpc.ChannelConnectivity.READY)

    def close(self) -> None:
        self._closed = True
        self._channel.unsubscribe(self._on_connectivity)
        _wait_for_poller(self._channel)
        self._channel.close()

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        with self._state_changed:
            self._state = state
            self._state_changed.notify_all()

    def _callable(self, method: Method) -> Any:
        found = self._callables.get(method.path)  # a dict read needs no lock: once made, kept
        if found is not None:
            return found
        with self._lock:
            found = self._callables.get(method.path)
            if found is None:
                found = self._channel.unary_unary(
                    method.path,
                    request_serializer=method.request_class.SerializeToString,
                    response_deserializer=method.response_class.FromString,
                )
                self._callables[method.path] = found
            return found


def _poke(_state: grpc.ChannelConnectivity) -> None:
    """Subscribing with ``try_to_connect`` is gRPC's public way to make an idle channel
    connect; this callback only carries that request."""


def _check_metadata_value(value: str) -> None:
    """gRPC refuses a metadata value that is not printable ASCII locally, on every call
    (INTERNAL "Invalid metadata"): nothing would ever leave this host. Refuse it here, once."""
    if not value or not all(" " <= ch <= "~" for ch in value):
        raise ConfigError(
            "the API key must be printable ASCII (gRPC sends it as metadata and refuses "
            "anything else before the call leaves this host); copy it again from recrypt.net/api"
        )


def _wait_for_poller(channel: grpc.Channel, bound: float = 0.5) -> None:
    """gRPC polls connectivity in a thread that notices an unsubscribe within 0.2 s; closing
    the channel under it makes that thread die with a traceback ("Cannot monitor channel
    state: Channel closed!"). Wait for it to stop (grpc/_channel.py, _poll_connectivity)."""
    state = getattr(channel, "_connectivity_state", None)
    give_up = time.monotonic() + bound
    while getattr(state, "polling", False) and time.monotonic() < give_up:
        time.sleep(0.01)


class ClientSlot:
    """The client new calls use, and the retired ones still finishing their calls.

    A reload puts a new client in the slot; the old one is closed only once the last call
    that started on it has been answered, so a reload never cancels a call in flight (each
    cancelled call would be an unknown outcome).
    """

    def __init__(self, client: RecryptClient) -> None:
        self._lock = threading.Lock()
        self._current = client
        self._users: dict[int, int] = {}
        self._retired: dict[int, RecryptClient] = {}

    @property
    def current(self) -> RecryptClient:
        return self._current

    @contextmanager
    def use(self) -> Iterator[RecryptClient]:
        """The current client, kept open until the block ends."""
        with self._lock:
            client = self._current
            self._users[id(client)] = self._users.get(id(client), 0) + 1
        try:
            yield client
        finally:
            self._done(client)

    def replace(self, client: RecryptClient) -> None:
        """New calls use ``client``; the old one closes when its last call is answered."""
        with self._lock:
            old, self._current = self._current, client
            self._retired[id(old)] = old
        self._close_idle()

    def close(self) -> None:
        """Stop: close every client now; calls still in flight are cancelled."""
        with self._lock:
            clients = [self._current, *self._retired.values()]
            self._retired.clear()
        for client in clients:
            client.close()

    def _done(self, client: RecryptClient) -> None:
        with self._lock:
            left = self._users.pop(id(client)) - 1
            if left:
                self._users[id(client)] = left
        self._close_idle()

    def _close_idle(self) -> None:
        with self._lock:
            idle = [k for k in self._retired if not self._users.get(k)]
            closing = [self._retired.pop(k) for k in idle]
        for client in closing:
            client.close()


def open_channel(config: RecryptConfig) -> grpc.Channel:
    """TLS to the target unless the config explicitly says ``tls = false``."""
    if not config.tls:
        _warn_plaintext(config.target)
        return grpc.insecure_channel(config.target, options=_CHANNEL_OPTIONS)
    return grpc.secure_channel(config.target, _credentials(config), options=_CHANNEL_OPTIONS)


def _warn_plaintext(target: str) -> None:
    """``tls = false`` is for a simulator on this host; anywhere else the key travels in clear."""
    if is_loopback(target.rpartition(":")[0].strip("[]")):
        return
    logging.getLogger("outbox.client").warning(
        "event=plaintext_target target=%s: [recrypt] tls = false sends the API key unencrypted "
        "to a host that is not this one; set tls = true",
        target,
    )


def _credentials(config: RecryptConfig) -> grpc.ChannelCredentials:
    """The system trust store, or ``[recrypt] ca_file``."""
    root = None
    if config.ca_file:
        try:
            root = Path(config.ca_file).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"[recrypt] ca_file: cannot read {config.ca_file}: {exc.strerror}; point it at a "
                "PEM CA bundle, or leave it empty for the system trust store"
            ) from None
    if root is not None and b"-----BEGIN CERTIFICATE-----" not in root:
        raise ConfigError(
            f"[recrypt] ca_file: {config.ca_file} holds no PEM certificate "
            "(-----BEGIN CERTIFICATE-----); point it at a PEM CA bundle"
        )
    return grpc.ssl_channel_credentials(root_certificates=root)
