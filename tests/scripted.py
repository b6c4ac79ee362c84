"""A scripted, in-memory Recrypt client for fast dispatcher tests: no threads, no network.

``ScriptedClient`` implements ``outbox.client.RecryptClient`` (what ``Dispatcher`` takes).
Each call is answered from a script: first a reply queued for the request's idempotency key
(``on_key``), else one queued for its method (``on_method``), else the next reply queued for
any call (``then``), else ``default`` (OK with the method's empty response). A reply is OK
with a response, a status code and message, an exception raised when the answer is awaited,
or "never started" (the channel was closed before the call). Every request is recorded in
``sent`` in the order the dispatcher started it.

It complements the simulator (``outbox.simulator``): the simulator tests the real gRPC path;
this one lets a dispatcher cycle run in milliseconds with its clock in the test's hands.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message as pb

from outbox.client import Answer, Metadata, PendingCall
from outbox.descriptors import KEY_FIELD, Method

OK = grpc.StatusCode.OK


@dataclass(frozen=True)
class Reply:
    """One scripted answer. ``response``: field values for the method's response (OK only)."""

    code: grpc.StatusCode = OK
    message: str = ""
    response: dict[str, Any] | None = None
    started: bool = True
    raises: BaseException | None = None
    duration_ms: float = 1.0


def ok(**response: Any) -> Reply:
    return Reply(OK, response=response)


def status(code: grpc.StatusCode, message: str = "") -> Reply:
    return Reply(code, message)


def raising(exc: BaseException) -> Reply:
    return Reply(raises=exc)


def never_started(reason: str = "not sent: channel closed") -> Reply:
    return Reply(grpc.StatusCode.CANCELLED, reason, started=False)


@dataclass(frozen=True)
class Sent:
    """One call the dispatcher started, with the reply it was given."""

    method: str
    key: str | None
    request: pb.Message
    reply: Reply
    metadata: Metadata = ()  # besides the apikey: the attempt's trace context, when traced


class _Pending:
    def __init__(self, method: Method, reply: Reply) -> None:
        self._method = method
        self._reply = reply

    def wait(self) -> Answer:
        reply = self._reply
        if reply.raises is not None:
            raise reply.raises
        response = None
        if reply.code == OK:
            response = self._method.response_class(**(reply.response or {}))
        return Answer(reply.code, reply.message, response, reply.duration_ms, reply.started)


@dataclass
class ScriptedClient:
    """See the module docstring. ``ready``: what ``wait_ready`` answers (False: no channel)."""

    default: Reply = field(default_factory=Reply)
    ready: bool = True
    sent: list[Sent] = field(default_factory=list)
    closed: bool = False
    _by_key: dict[str, deque[Reply]] = field(default_factory=lambda: defaultdict(deque))
    _by_method: dict[str, deque[Reply]] = field(default_factory=lambda: defaultdict(deque))
    _calls: deque[Reply] = field(default_factory=deque)

    # ---- the script

    def on_key(self, key: str, *replies: Reply) -> ScriptedClient:
        self._by_key[key].extend(replies)
        return self

    def on_method(self, path: str, *replies: Reply) -> ScriptedClient:
        self._by_method[path].extend(replies)
        return self

    def then(self, *replies: Reply) -> ScriptedClient:
        self._calls.extend(replies)
        return self

    # ---- what the dispatcher sees (outbox.client.RecryptClient)

    def start(self, method: Method, request: pb.Message, metadata: Metadata = ()) -> PendingCall:
        key = str(getattr(request, KEY_FIELD)) if method.submittable else None
        reply = self._next(method.path, key)
        self.sent.append(Sent(method.path, key, request, reply, metadata))
        return _Pending(method, reply)

    def wait_ready(self, timeout: float) -> bool:
        return self.ready and not self.closed

    def send_all(
        self,
        calls: Sequence[tuple[Method, pb.Message]],
        metadata: Sequence[Metadata] | None = None,
    ) -> list[Answer]:
        extra = metadata if metadata is not None else [()] * len(calls)
        pending = [self.start(m, r, more) for (m, r), more in zip(calls, extra, strict=True)]
        return [p.wait() for p in pending]

    def close(self) -> None:
        self.closed = True

    # ---- observation

    def keys_sent(self, method: str | None = None) -> list[str | None]:
        """The idempotency keys sent, in order (``method``: only that method's calls)."""
        return [s.key for s in self.sent if method is None or s.method == method]

    def _next(self, path: str, key: str | None) -> Reply:
        for queue in (self._by_key.get(key or ""), self._by_method.get(path), self._calls):
            if queue:
                return queue.popleft()
        return self.default
