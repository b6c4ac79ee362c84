"""``outbox status`` (for people and ``--json``) and ``outbox check`` (for monitoring).

``check`` speaks Nagios: one line, exit 0 ok, 1 warning, 2 critical (its own failures are
critical). The verdict itself is ``outbox.health.judge``; this module only reads the store
and prints.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import click

from outbox.cli.app import Outbox, describe_failure, main, pass_outbox
from outbox.cli.output import emit_json, status_json
from outbox.cli.render import console, print_status
from outbox.clock import utcnow
from outbox.gates import SENDS_NOTHING
from outbox.health import CRITICAL, Rules, Verdict, judge


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
@pass_outbox
def status(obj: Outbox, as_json: bool) -> None:
    """Counts per state, the oldest due row, parked rows, blocked lanes and the workers."""
    now, stale_after = utcnow(), obj.config.check.heartbeat_stale
    view = obj.store().status(now)
    if as_json:
        emit_json(status_json(view, now, stale_after))
    else:
        print_status(console(), view, now, stale_after)


@main.command()
@pass_outbox
def check(obj: Outbox) -> None:
    """Monitoring: one line; exit 0 ok, 1 warning, 2 critical."""
    try:
        verdict = _verdict(obj)
    except Exception as exc:  # a probe answers CRITICAL, never a traceback
        summary = " ".join(describe_failure(exc, obj).split())  # one line, always
        verdict = Verdict(CRITICAL, f"cannot read the outbox: {summary}")
    click.echo(verdict.line())
    sys.exit(verdict.level)


def _verdict(obj: Outbox) -> Verdict:
    now, c = utcnow(), obj.config.check
    store = obj.store()
    retrying = store.retrying(now - timedelta(seconds=c.retrying_warning), c.attempts_warning)
    rules = Rules(c, obj.config.worker.lease, SENDS_NOTHING)
    return judge(store.status(now), rules, now, retrying)
