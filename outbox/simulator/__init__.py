"""A stand-in for the Recrypt gRPC API on loopback, with fault injection (tests and the demo).

The package's modules, by responsibility:

- ``faults``: the fault model (``Fault``) and the text forms (``--fault`` specs, the control
  file's grammar ``Control``);
- ``ledger``: what took effect per idempotency key and every call answered (no ``grpc``);
- ``model``: the business logic of the model methods (transfers, orders, maintenance check);
- ``server``: ``Simulator``, the gRPC server, its handlers and its lifecycle;
- ``cli``: ``main_serve`` (what ``outbox simulator`` runs) and ``ControlFile``.

Callers import from ``outbox.simulator``; every name below stays importable from here.
"""

from __future__ import annotations

from outbox.simulator.cli import ControlFile, main_serve
from outbox.simulator.faults import SPEC_FORM, Control, Fault
from outbox.simulator.ledger import CallRecord, LedgerEntry
from outbox.simulator.model import (
    CANCEL_ORDER,
    GET_BALANCES,
    MAINTENANCE_CHECK,
    PLACE_ORDER,
    STREAM_ORDER_UPDATES,
    TRANSFER,
)
from outbox.simulator.server import (
    DEFAULT_API_KEYS,
    HANG_POLL,
    MAINTENANCE_MESSAGE,
    MAX_WORKERS,
    OK,
    Simulator,
)

__all__ = [
    "CANCEL_ORDER",
    "DEFAULT_API_KEYS",
    "GET_BALANCES",
    "HANG_POLL",
    "MAINTENANCE_CHECK",
    "MAINTENANCE_MESSAGE",
    "MAX_WORKERS",
    "OK",
    "PLACE_ORDER",
    "SPEC_FORM",
    "STREAM_ORDER_UPDATES",
    "TRANSFER",
    "CallRecord",
    "Control",
    "ControlFile",
    "Fault",
    "LedgerEntry",
    "Simulator",
    "main_serve",
]
