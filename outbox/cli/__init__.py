"""``outbox``: the command line (SPEC §6) for operators, scripts and monitoring.

People get rich tables; scripts pass ``--json`` and get exactly one JSON document on stdout.
Every error this package raises on purpose (and an unreachable database) becomes one line
``error: …`` on stderr with exit 1, never a traceback; click's usage errors exit 2. ``check``
speaks Nagios: one line, exit 0 ok, 1 warning, 2 critical (its own failures are critical).

A thin layer: ``app`` (the group, its context, the error line), one module of commands per
area (``db``, ``setup``, ``rows``, ``operator``, ``monitor``, ``report``, ``daemon``), and what
they print apart from them (``render``: tables for people; ``output``: JSON for scripts). The
monitoring verdict is ``outbox.health``'s. Nothing outside this package imports it: it is the
top layer.
"""

from __future__ import annotations

from outbox.cli import (  # noqa: F401 (registers them)
    actions,
    daemon,
    db,
    holds,
    initialise,
    monitor,
    report,
    rows,
)
from outbox.cli.app import main
from outbox.cli.daemon import DEFAULT_SIMULATOR_KEY
from outbox.console.commands import console

main.add_command(console)  # `outbox console …`: the web console (outbox/console/)

__all__ = ["DEFAULT_SIMULATOR_KEY", "main"]
