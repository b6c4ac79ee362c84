"""The fault model and its text forms: ``Fault`` (an injected answer) and ``Control`` (what
one read of the simulator's control file sets).

Parsing only: nothing here serves calls or knows a ``Simulator``. It must not import
``outbox.simulator.server`` or ``outbox.simulator.cli``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc

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
