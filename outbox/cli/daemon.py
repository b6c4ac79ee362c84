"""``outbox run`` (the daemon), ``outbox simulator`` (a local Recrypt) and ``outbox demo``.

grpc, APScheduler and the daemon load only inside these commands, never at the CLI's start.
"""

from __future__ import annotations

import sys

import click

from outbox.cli.app import Outbox, fail, main, pass_outbox
from outbox.config import load

DEFAULT_SIMULATOR_LISTEN = "127.0.0.1:50051"
DEFAULT_SIMULATOR_KEY = "test-key"  # outbox.simulator.DEFAULT_API_KEYS (a test holds them equal)


@main.command()
@pass_outbox
def run(obj: Outbox) -> None:
    """Run the daemon in the foreground (systemd: Type=notify)."""
    from outbox import logs  # noqa: PLC0415 (grpc and APScheduler load only for the daemon)
    from outbox.daemon import Daemon  # noqa: PLC0415

    config = load(obj.config_path)  # with the API key: the one command that calls Recrypt
    logs.setup(config.logging.level, config.logging.format)
    sys.exit(Daemon(config, obj.config_path).run())


def _simulator_control_help() -> str:
    """The control file's grammar, without importing grpc for every command's start."""
    return (
        "--control FILE: re-read when it changes; each read replaces the last; one\n"
        "directive a line (# starts a comment line; empty: all clear):\n"
        "  fault SPEC            as --fault (repeatable)\n"
        "  maintenance on|off    every call PERMISSION_DENIED\n"
        "  rollover START END    window MaintenanceCheck reports (ISO UTC)\n"
        "  keys KEY[,KEY...]     accepted API keys (others UNAUTHENTICATED)\n"
        "A bad line is reported with its number; the previous settings stay."
    )


SIMULATOR_HELP = f"""A local Recrypt stand-in (plaintext, loopback) with faults, until Ctrl-C.

\b
Without --api-key it accepts the key "{DEFAULT_SIMULATOR_KEY}" (RECRYPT_API_KEY=test-key).
Never expose it beyond loopback: it checks no TLS and holds no real money.

\b
--fault SPEC (repeatable) answers matching calls with an error:
  CODE[:MESSAGE][@METHODS][:OPTION]...
  CODE     a gRPC status name, any case (UNAVAILABLE, failed_precondition)
  MESSAGE  the status message (may hold : and spaces)
  METHODS  full gRPC paths, comma-separated; none: every method
  OPTION   execute (perform the effect, then fail), xN (next N calls
           only), delay=SECONDS (hold the answer back)
  e.g. UNAVAILABLE:vgw-db:x3, UNAVAILABLE:vgw-db:execute,
  FAILED_PRECONDITION:limit@/recrypt.wallet.v1.Wallet/Transfer

\b
{{control}}
"""


@main.command(help=SIMULATOR_HELP.format(control=_simulator_control_help()))
@click.option("--listen", default=DEFAULT_SIMULATOR_LISTEN, show_default=True, help="HOST:PORT.")
@click.option("--api-key", "api_keys", multiple=True, help="An accepted key (repeatable).")
@click.option("--fault", "faults", multiple=True, help="A fault SPEC (above; repeatable).")
@click.option("--transfer-limit", default="10000", show_default=True, help="Decimal amount.")
@click.option("--proto-path", default=None, help="Recrypt's .proto directory or descriptor set.")
@click.option(
    "--control",
    type=click.Path(dir_okay=False),
    default=None,
    help="A control file re-read when it changes (above).",
)
def simulator(
    *,
    listen: str,
    api_keys: tuple[str, ...],
    faults: tuple[str, ...],
    transfer_limit: str,
    proto_path: str | None,
    control: str | None,
) -> None:
    from outbox.simulator import main_serve  # noqa: PLC0415 (grpc loads only when needed)

    try:
        main_serve(
            listen, list(api_keys), list(faults), transfer_limit, proto_path, control=control
        )
    except (ValueError, OSError) as exc:
        fail(str(exc))


@main.command()
def demo() -> None:
    """All of it on SQLite + the simulator, in one command."""
    from outbox.cli.render import print_rows  # noqa: PLC0415 (rich: only for the table)
    from outbox.demo import run_demo  # noqa: PLC0415 (the demo pulls in everything)

    sys.exit(run_demo(print_rows))
