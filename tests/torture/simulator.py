"""The simulated Recrypt of the torture run: restartable, one API key per daemon, recording.

Must not import the chaos, the writers nor the checks.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
from google.protobuf import json_format

from outbox.simulator import MAINTENANCE_CHECK, Simulator
from tests.torture.observed import Probe, Span
from tests.torture.vocabulary import API_KEY, WRONG_KEY, C


class TortureSimulator(Simulator):
    """The simulator, restartable on the same port with its ledger kept, recording spans.

    - ``start`` clears ``_stopped`` (older simulators set it for good on ``stop``, so ``delay``
      and ``hang`` faults became no-ops after a restart).
    - Every unary call with a key leaves a ``Span`` (``spans``): ``CallRecord`` has only the
      answer's time, not the arrival, nor whether the caller still waited, nor who called.
    - API keys: one per daemon process (``allow_key``), all refused during a wrong-key window
      (``refuse_keys``).
    - Every ``Core.MaintenanceCheck`` leaves a ``Probe`` (``probes``), with who asked.
    """

    def __init__(self) -> None:
        super().__init__(api_keys=[API_KEY])
        self._local = threading.local()
        self._spans: list[Span] = []
        self._probes: list[Probe] = []
        self._daemon_keys = {API_KEY}
        self._refusing = False

    def start(self, listen: str = "127.0.0.1:0", *, tls: tuple[bytes, bytes] | None = None) -> int:
        self._stopped.clear()
        return super().start(listen, tls=tls)

    @property
    def spans(self) -> list[Span]:
        with self._cond:
            return list(self._spans)

    @property
    def probes(self) -> list[Probe]:
        with self._cond:
            return list(self._probes)

    def allow_key(self, key: str) -> None:
        with self._cond:
            self._daemon_keys.add(key)
        self._apply_keys()

    def refuse_keys(self, refusing: bool) -> None:
        with self._cond:
            self._refusing = refusing
        self._apply_keys()

    def _apply_keys(self) -> None:
        with self._cond:
            self.set_api_keys([WRONG_KEY] if self._refusing else sorted(self._daemon_keys))

    def _serve_unary(self, method: Any, request: Any, context: grpc.ServicerContext) -> Any:
        self._local.start = self._clock()
        self._local.request = request
        return super()._serve_unary(method, request, context)

    def _record_call(
        self, path: str, key: str | None, outcome: Any, context: grpc.ServicerContext
    ) -> None:
        super()._record_call(path, key, outcome, context)
        start, self._local.start = getattr(self._local, "start", None), None
        caller = next(
            (str(v) for k, v in context.invocation_metadata() or () if k == "apikey"), None
        )
        if path == MAINTENANCE_CHECK:
            said = bool(getattr(outcome.response, "maintenance_mode", False))
            refused = outcome.code == C.PERMISSION_DENIED
            heard = context.is_active() and not self._stopped.is_set()
            probe = Probe(caller, self._clock(), outcome.code.name, said or refused, heard)
            with self._cond:
                self._probes.append(probe)
        if key is None or start is None:
            return
        request = json_format.MessageToDict(self._local.request, preserving_proto_field_name=True)
        span = Span(
            key,
            path,
            start,
            self._clock(),
            outcome.code.name,
            bool(outcome.executed),
            context.is_active() and not self._stopped.is_set(),  # a stop drops the answer
            caller,
            request,
            outcome.message if outcome.code != C.OK else "",
        )
        with self._cond:
            self._spans.append(span)
