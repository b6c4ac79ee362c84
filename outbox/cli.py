"""``outbox``: the command line (SPEC §6) for operators, scripts and monitoring.

People get rich tables; scripts pass ``--json`` and get exactly one JSON document on stdout.
Every error this package raises on purpose (and an unreachable database) becomes one line
``error: …`` on stderr with exit 1, never a traceback; click's usage errors exit 2. ``check``
speaks Nagios: one line, exit 0 ok, 1 warning, 2 critical (its own failures are critical).

The configuration is loaded lazily, so ``simulator`` and ``demo`` need none, and only ``run``
reads the Recrypt API key: every other command works with the key file absent or unreadable
(an operator's account, a monitoring probe). Nothing here ever prints the key.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import math
import os
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import click
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import Engine, make_url

from outbox import install, migrate, roles
from outbox.clock import utcnow
from outbox.config import CheckConfig, Config, load
from outbox.console.commands import console as console_group
from outbox.database import make_engine, normalise_url
from outbox.errors import OutboxError
from outbox.health import expired_lease_note, failure_note, lasted, n_rows
from outbox.logs import describe_error
from outbox.schema import State
from outbox.store import HistoryLine, RetryingView, RowView, StatusView, Store, WorkerView

OK, WARNING, CRITICAL = 0, 1, 2
LIST_MESSAGE_WIDTH = 60
DEFAULT_SIMULATOR_LISTEN = "127.0.0.1:50051"
DEFAULT_SIMULATOR_KEY = "test-key"  # outbox.simulator.DEFAULT_API_KEYS (a test holds them equal)


class InputError(OutboxError):
    """A command-line value that parses but cannot be used (bad JSON, naive time)."""


# --------------------------------------------------------------------------- context


class Outbox:
    """What the commands share: the config path, and the config/engine/store made on demand."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None
        self._engine: Engine | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load(self.config_path, with_key=False)  # only `run` reads the key
        return self._config

    @property
    def url(self) -> str:
        return self.config.database.url

    def engine(self, *, create: bool = False) -> Engine:
        """The engine; unless ``create``, a missing SQLite file is an error, not a new file."""
        if self._engine is None:
            _refuse_missing_sqlite(self.url, create)
            self._engine = make_engine(self.url)
        return self._engine

    def store(self) -> Store:
        """A store on a schema at head (else: run ``outbox db upgrade``)."""
        engine = self.engine()
        migrate.ensure_at_head(engine)
        return Store(engine)

    def shown_url(self) -> str | None:
        """The database URL without its password, once the config has loaded."""
        return shown_url(self.url) if self._config is not None else None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _refuse_missing_sqlite(url: str, create: bool) -> None:
    parsed = normalise_url(url)  # a bad URL: one line naming [database] url
    if create or parsed.get_backend_name() != "sqlite":
        return
    if parsed.database and parsed.database != ":memory:" and not Path(parsed.database).exists():
        raise OutboxError(
            f"no database at {shown_url(url)} (the file does not exist): run `outbox db upgrade` "
            "to create it, or point OUTBOX_DATABASE_URL / --config at the outbox database"
        )


def shown_url(url: str) -> str:
    """The URL as it may be shown: never with its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(an unparsable URL)"


def describe_failure(exc: BaseException, obj: Outbox | None) -> str:
    """One line for an OutboxError, or a database error naming the URL (not the password)."""
    if isinstance(exc, OutboxError):
        return str(exc)
    reason = describe_error(exc)  # a database may quote a row's value: never shown
    if not isinstance(exc, sa.exc.SQLAlchemyError):
        return f"{type(exc).__name__}: {reason}"
    where = obj.shown_url() if obj is not None else None
    return f"database {where}: {reason}" if where else f"database: {reason}"


class OutboxGroup(click.Group):
    """Turns expected failures of any subcommand into one ``error: …`` line and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (OutboxError, sa.exc.DBAPIError) as exc:
            obj = ctx.obj if isinstance(ctx.obj, Outbox) else None
            fail(describe_failure(exc, obj))


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(cls=OutboxGroup)
@click.option(
    "--config",
    "config_path",
    envvar="OUTBOX_CONFIG",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file (env OUTBOX_CONFIG); without it: defaults plus env overrides.",
)
@click.version_option(package_name="recrypt-outbox")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """recrypt-outbox: a transactional outbox for the Recrypt gRPC API."""
    ctx.obj = Outbox(config_path)
    ctx.call_on_close(ctx.obj.close)


pass_outbox = click.make_pass_decorator(Outbox)


# --------------------------------------------------------------------------- output helpers


def console() -> Console:
    """A console on the current stdout (tests swap it); plain, unwrapped text when piped."""
    return Console(highlight=False)


def emit_json(document: dict[str, Any]) -> None:
    click.echo(json.dumps(document, indent=2, ensure_ascii=False, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Decimal):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain_json(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _maybe_json(value: Any) -> Any:
    """Payload/response as a JSON value when the stored text is valid JSON, else as it is."""
    if not isinstance(value, str | bytes):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _row_json(row: RowView, *, with_payload: bool = True) -> dict[str, Any]:
    """The one JSON form of a row (``list``, ``show``): datetimes as ISO 8601 UTC."""
    data = {k: iso(v) if isinstance(v, datetime) else v for k, v in _fields(row).items()}
    if with_payload:
        data["payload"], data["response"] = _maybe_json(row.payload), _maybe_json(row.response)
    else:
        del data["payload"], data["response"]
    return data


def _fields(item: Any) -> dict[str, Any]:
    return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}


def _plain_json(item: Any) -> dict[str, Any]:
    return {k: iso(v) if isinstance(v, datetime) else v for k, v in _fields(item).items()}


def text(value: Any) -> Text:
    """A table cell: never read as rich markup (row data may contain ``[...]``)."""
    return Text("" if value is None else str(value))


def short_method(method: str) -> str:
    """``/recrypt.wallet.v1.Wallet/Transfer`` → ``Wallet/Transfer``."""
    service, _, name = method.rpartition("/")
    return f"{service.rpartition('.')[2]}/{name}" if service else method


def clip(value: str | None, width: int) -> str:
    value = " ".join((value or "").split())
    return value if len(value) <= width else value[: width - 1] + "…"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


# --------------------------------------------------------------------------- db


@main.group()
def db() -> None:
    """The schema: `db upgrade` migrates to head, `db current` says where it is."""


@db.command("upgrade")
@pass_outbox
def db_upgrade(obj: Outbox) -> None:
    """Migrate the database to the newest schema (creates a SQLite file if needed)."""
    engine = obj.engine(create=True)
    migrate.upgrade(engine)
    click.echo(f"{shown_url(obj.url)} is at revision {migrate.current(engine)} (head)")


@db.command("current")
@pass_outbox
def db_current(obj: Outbox) -> None:
    """Show the database's schema revision and the head this version needs; exit 1 off head."""
    engine = obj.engine()
    found, wanted = migrate.current(engine), migrate.head()
    click.echo(f"database: {shown_url(obj.url)}")
    click.echo(f"current:  {found or 'none (no outbox tables)'}")
    click.echo(f"head:     {wanted}")
    click.echo("at head:  " + ("yes" if found == wanted else "no: run `outbox db upgrade`"))
    migrate.ensure_at_head(engine)  # off head: one line saying what to do, exit 1


@db.command("roles")
@click.option("--print", "print_sql", is_flag=True, help="Print the SQL (required).")
@click.option("--grants", is_flag=True, help="Step 2: the grants, to run after `db upgrade`.")
@click.option(
    "--backend",
    type=click.Choice(sorted(roles.BACKENDS)),
    help="Default: the config's database URL.",
)
@click.option("--database", help="The outbox database's name. Default: the config's.")
@click.option("--prefix", default="outbox", show_default=True, help="Roles are PREFIX_owner, …")
@click.option("--host", default="%", show_default=True, help="MariaDB: the accounts' host.")
@pass_outbox
def db_roles(
    obj: Outbox,
    *,
    print_sql: bool,
    grants: bool,
    backend: str | None,
    database: str | None,
    prefix: str,
    host: str,
) -> None:
    """Print the SQL creating the owner, daemon, writer, reader and operator roles.

    Step 1 (this) before the first `db upgrade`, step 2 (--grants) after each one; an
    administrator runs both with psql or mariadb (docs/operations.md, "Database roles").
    """
    if not print_sql:
        fail("pass --print: the SQL is run by an administrator, e.g. `… --print | psql`")
    url = make_url(obj.url) if backend is None or database is None else None
    source = "--backend" if backend else "the [database] url"
    backend = backend or (url.get_backend_name() if url else "")
    names = roles.RoleNames(database or (url.database if url else None) or "", prefix, host)
    click.echo(roles.script(backend, names, grants=grants, source=source), nl=False)


# --------------------------------------------------------------------------- install


@main.command("init")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Fill in a key, e.g. database.url=postgresql://… (repeatable).",
)
@pass_outbox
def init(obj: Outbox, path: Path | None, settings: tuple[str, ...]) -> None:
    """Write a commented config file to PATH (default: --config); never overwrites."""
    target = path or (Path(obj.config_path) if obj.config_path else None)
    if target is None:
        fail("give the file to write: outbox init /etc/outbox/outbox.toml")
    install.write_config(target, settings)
    click.echo(f"wrote {target} (mode 0640): edit it, then `outbox --config {target} db current`")


@main.command("systemd")
@click.option("--print", "print_units", is_flag=True, help="Print the units to stdout.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Write the units there, e.g. /etc/systemd/system.",
)
@click.option("--force", is_flag=True, help="With --dir: replace units already there.")
@pass_outbox
def systemd_units(obj: Outbox, print_units: bool, directory: Path | None, force: bool) -> None:
    """The systemd units for this installation: its `outbox` and the --config file."""
    if not obj.config_path:
        fail("pass --config PATH (or OUTBOX_CONFIG): the units name the config file")
    if print_units == (directory is not None):
        fail("pass either --print or --dir DIR")
    rendered = install.units(Path(obj.config_path))
    if directory is None:
        click.echo(install.printed_units(rendered), nl=False)
        return
    for written in install.write_units(directory, rendered, force=force):
        click.echo(f"wrote {written}")


# --------------------------------------------------------------------------- run


@main.command()
@pass_outbox
def run(obj: Outbox) -> None:
    """Run the daemon in the foreground (systemd: Type=notify)."""
    from outbox import logs  # noqa: PLC0415 (grpc and APScheduler load only for the daemon)
    from outbox.daemon import Daemon  # noqa: PLC0415

    config = load(obj.config_path)  # with the API key: the one command that calls Recrypt
    logs.setup(config.logging.level, config.logging.format)
    sys.exit(Daemon(config, obj.config_path).run())


# --------------------------------------------------------------------------- enqueue


def parse_time(option: str, value: str | None) -> datetime | None:
    """ISO 8601 with a zone (``Z`` or ``+00:00``); a naive time is refused, not guessed."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InputError(
            f"{option} {value!r} is not an ISO 8601 time; e.g. 2030-01-31T18:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        raise InputError(f"{option} {value!r} has no time zone: add Z or +00:00: times are UTC")
    return parsed.astimezone(UTC)


def parse_payload(value: str) -> dict[str, Any]:
    """``--json``: inline JSON, or ``@path`` to read it from a file. Numbers stay exact."""
    source = "--json"
    if value.startswith("@"):
        source = f"--json file {value[1:]}"
        try:
            value = Path(value[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"{source}: cannot read it: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise InputError(f"{source}: is not UTF-8 text") from None
    try:
        payload = json.loads(value)  # a float where a string belongs is protobuf's to refuse
    except json.JSONDecodeError as exc:
        raise InputError(f"{source} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InputError(f"{source} is nested too deeply") from None
    if not isinstance(payload, dict):
        raise InputError(
            f"{source} must be a JSON object (the request in protobuf JSON mapping), "
            f"got {type(payload).__name__}"
        )
    return payload


@main.command()
@click.argument("method")
@click.option("--json", "payload_text", required=True, help="The request as JSON, or @FILE.")
@click.option("--key", help="Idempotency key (a lowercase UUID); default: a new one.")
@click.option("--lane", help="Rows sharing a lane are sent one at a time, in order.")
@click.option("--not-before", help="ISO 8601 UTC time, e.g. 2030-01-31T18:00:00Z.")
@click.option("--expires-at", help="ISO 8601 UTC time after which the row is not sent.")
@click.option("--reference", help="Your own correlation id, shown by list/show.")
@pass_outbox
def enqueue(
    obj: Outbox,
    *,
    method: str,
    payload_text: str,
    key: str | None,
    lane: str | None,
    not_before: str | None,
    expires_at: str | None,
    reference: str | None,
) -> None:
    """Add one outbox row for METHOD (a full gRPC path) and print its key."""
    from outbox.descriptors import Catalog  # noqa: PLC0415 (protobuf loads only when needed)
    from outbox.writer import enqueue as enqueue_row  # noqa: PLC0415

    payload = parse_payload(payload_text)
    times = parse_time("--not-before", not_before), parse_time("--expires-at", expires_at)
    catalog = Catalog.load(obj.config.recrypt.proto_path or None)
    with obj.store().engine.begin() as conn:
        made = enqueue_row(
            conn,
            method,
            payload,
            key=key,
            lane=lane,
            not_before=times[0],
            expires_at=times[1],
            reference=reference,
            catalog=catalog,
        )
    click.echo(made)


# --------------------------------------------------------------------------- list / show


@main.command("list")
@click.option("--state", type=click.Choice([s.value for s in State]), help="Only this state.")
@click.option("--method", help="Only this full gRPC path.")
@click.option("--lane", help="Only this lane.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
@pass_outbox
def list_rows(
    obj: Outbox,
    *,
    state: str | None,
    method: str | None,
    lane: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List rows, newest first."""
    rows = obj.store().list_rows(state=state, method=method, lane=lane, limit=limit)
    if as_json:
        emit_json({"rows": [_row_json(r, with_payload=False) for r in rows]})
        return
    out = console()
    if rows:
        print_rows(out, rows)
    else:
        out.print("no rows match")
    if any(row.maybe_executed for row in rows):
        out.print(Text(MAYBE_NOTE))


MAYBE_MARK = "*"
MAYBE_NOTE = f"{MAYBE_MARK} may have executed at Recrypt (maybe_executed): check before cancel"


ROW_HEADERS = ("key", "state", "method", "att", "lane", "code")
NARROW_MESSAGE_ROOM = 20


def print_rows(out: Console, rows: Sequence[RowView]) -> None:
    """One line per row when the terminal is wide enough, else two; full keys (to copy)."""
    cells = [row_cells(row) for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(ROW_HEADERS)]
    room = out.width - sum(widths) - 2 * len(widths)
    if room >= NARROW_MESSAGE_ROOM:
        out.print(rows_table(cells, widths, room))
        return
    for key, state, method, att, lane, code, message in cells:
        lane_part = f"  lane {lane}" if lane else ""
        out.print(Text(f"{key}  {state}  {method}  att {att}{lane_part}"), no_wrap=True)
        detail = f"{code}: {message}" if code else message
        if detail:
            out.print(Text(f"    {detail}"), no_wrap=True, overflow="ellipsis")


def rows_table(cells: list[list[str]], widths: list[int], room: int) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, width in zip(ROW_HEADERS, widths, strict=True):
        table.add_column(name, no_wrap=True, min_width=width)
    table.add_column("last message", no_wrap=True)
    for line in cells:
        table.add_row(*map(text, line[:-1]), text(clip(line[-1], room)))
    return table


def row_cells(row: RowView) -> list[str]:
    """key, state (``*``: maybe executed), method, attempts, lane, code, clipped message."""
    state = row.state + (MAYBE_MARK if row.maybe_executed else "")
    message = clip(row.last_message, LIST_MESSAGE_WIDTH)
    lane, code = clip(row.lane, 20), clip(row.last_code, 20)
    key, method, att = row.idempotency_key, short_method(row.method), str(row.attempts)
    return [key, state, method, att, lane, code, message]


@main.command()
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
@pass_outbox
def show(obj: Outbox, key: str, as_json: bool) -> None:
    """Show one row (with payload and response) and its attempt history."""
    store = obj.store()
    row, history = store.get(key), store.history(key)
    if as_json:
        emit_json({"row": _row_json(row), "history": [_plain_json(h) for h in history]})
        return
    out = console()
    out.print(row_table(row))
    for title, value in (("payload", row.payload), ("response", row.response)):
        out.print(Text(f"\n{title}:", style="bold"))
        out.print(text(_pretty(value)))
    out.print(Text("\nhistory:", style="bold"))
    if not history:
        out.print("  (no attempts yet)")
    print_history(out, history)


def _pretty(value: Any) -> str:
    parsed = _maybe_json(value)
    if parsed is None or isinstance(parsed, str):
        return "  (none)" if parsed is None else str(parsed)
    return json.dumps(parsed, indent=2, ensure_ascii=False)


def row_table(row: RowView) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in _row_json(row, with_payload=False).items():
        table.add_row(name, text("-" if value is None else value))
    return table


def print_history(out: Console, history: Iterable[HistoryLine]) -> None:
    """One event per entry: a heading line, then the full message indented (any width)."""
    for line in history:
        at = line.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        ms = None if line.duration_ms is None else f"{line.duration_ms:.0f} ms"
        head = (at, line.kind, line.actor, line.code, line.decision, ms)
        out.print(Text("  ".join(part for part in head if part)))
        if line.message:
            out.print(Text(f"    {line.message}"))


# --------------------------------------------------------------------------- operator actions


def default_actor() -> str:
    """Who acts: the sudo caller if any, else the login name; with the host."""
    user = os.environ.get("SUDO_USER")
    if not user:
        try:
            user = getpass.getuser()
        except (OSError, KeyError):
            user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _non_empty(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("must say why (it is recorded in the row's history)")
    return value.strip()


def operator_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--actor", default=default_actor, show_default="user@host", help="Recorded as who acted."
    )(command)
    return click.option(
        "--reason", required=True, callback=_non_empty, help="Why (recorded in the history)."
    )(command)


@main.command()
@click.argument("key")
@operator_options
@pass_outbox
def requeue(obj: Outbox, key: str, reason: str, actor: str) -> None:
    """Send a parked row again (parked -> pending), with the same key."""
    row = obj.store().requeue(key, actor, reason, utcnow())
    click.echo(f"{row.idempotency_key} requeued by {actor}: now {row.state}")


@main.command()
@click.argument("key")
@operator_options
@click.option("--force", is_flag=True, help="Also cancel a row that may have executed.")
@pass_outbox
def cancel(obj: Outbox, key: str, reason: str, actor: str, force: bool) -> None:
    """Cancel a pending or parked row; refuses one that may have executed unless --force."""
    row = obj.store().cancel(key, actor, reason, utcnow(), force)
    click.echo(f"{row.idempotency_key} cancelled by {actor}: now {row.state}")


# --------------------------------------------------------------------------- status


def liveness(worker: WorkerView, now: datetime, stale_after: float) -> str:
    """``live``, ``stale`` (no heartbeat for ``stale_after`` s: dead?) or ``stopped``."""
    if worker.stopped_at is not None:
        return "stopped"
    return "live" if (now - worker.last_beat_at).total_seconds() <= stale_after else "stale"


def oldest_due_age(view: StatusView, now: datetime) -> float | None:
    if view.oldest_due_at is None:
        return None
    return max(0.0, (now - view.oldest_due_at).total_seconds())


def status_json(view: StatusView, now: datetime, stale_after: float) -> dict[str, Any]:
    workers = [
        _plain_json(w)
        | {
            "liveness": liveness(w, now, stale_after),
            "beat_age_seconds": round((now - w.last_beat_at).total_seconds(), 3),
        }
        for w in view.workers
    ]
    expired = view.oldest_lease_expired_at
    return {
        "counts": view.counts,
        "oldest_due_age_seconds": oldest_due_age(view, now),
        "leases_expired": view.leases_expired,
        "oldest_lease_expired_age_seconds": (now - expired).total_seconds() if expired else None,
        "parked_by_reason": view.parked_by_reason,
        "blocked_lanes": view.blocked_lanes,
        "maybe_executed_open": view.maybe_executed_open,
        "workers": workers,
    }


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
@pass_outbox
def status(obj: Outbox, as_json: bool) -> None:
    """Counts per state, the oldest due row, parked rows, blocked lanes and the workers."""
    now, stale_after = utcnow(), obj.config.check.heartbeat_stale
    view = obj.store().status(now)
    if as_json:
        emit_json(status_json(view, now, stale_after))
        return
    out = console()
    out.print(Text("  ".join(f"{state} {n}" for state, n in view.counts.items())))
    out.print(Text(f"oldest due row: {age(oldest_due_age(view, now))}"))
    for line in attention_lines(view, now):
        out.print(text(line))
    out.print(workers_table(view.workers, now, stale_after) if view.workers else "no workers")
    for line in refused_lines(view.workers):
        out.print(text(line))


def attention_lines(view: StatusView, now: datetime) -> list[str]:
    lines = [
        f"{w.worker_id}: {failure_note(f, now)}"
        for w in view.workers
        if w.stopped_at is None
        for f in w.failing_jobs
    ]
    if view.leases_expired and view.oldest_lease_expired_at is not None:
        oldest = lasted((now - view.oldest_lease_expired_at).total_seconds())
        lines.append(
            f"rows in flight with an expired lease: {view.leases_expired} (oldest {oldest})"
        )
    if view.parked_by_reason:
        lines.append(f"parked by reason: {_reasons(view.parked_by_reason)}")
    if view.blocked_lanes:
        lines.append(f"lanes blocked by a parked row: {', '.join(view.blocked_lanes)}")
    if view.maybe_executed_open:
        lines.append(f"open rows that may have executed: {view.maybe_executed_open}")
    return lines


def _reasons(by_reason: dict[str, int]) -> str:
    ordered = sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{reason}={n}" for reason, n in ordered)


def workers_table(workers: Sequence[WorkerView], now: datetime, stale_after: float) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("worker", "version", "beat", "liveness", "gate", "since", "until"):
        table.add_column(name, overflow="fold")
    table.add_column("why", overflow="fold", ratio=1)
    for w in workers:
        alive = liveness(w, now, stale_after)
        shown = {"stale": "stale (dead?)"}.get(alive, alive)
        beat = age((now - w.last_beat_at).total_seconds()) + " ago"
        closed = w.gate_since if alive != "stopped" else None
        since = age((now - closed).total_seconds()) if closed else None
        until = w.gate_until.astimezone(UTC).strftime("%H:%M:%S") if w.gate_until else None
        cells = (w.worker_id, w.version, beat, shown, w.gate, since, until, w.gate_reason)
        table.add_row(*map(text, cells))
    return table


def refused_lines(workers: Sequence[WorkerView]) -> list[str]:
    """One line per running worker holding methods Recrypt refused outside maintenance."""
    return [
        f"{w.worker_id} holds methods Recrypt refused outside maintenance: "
        f"{method_names(w.refused_methods)}; {REFUSED_ADVICE}"
        for w in workers
        if w.refused_methods and w.stopped_at is None
    ]


def method_names(methods: Iterable[str], most: int = 5) -> str:
    """``Market/PlaceOrder, Wallet/Transfer`` (sorted; ``and N more`` past ``most``)."""
    names = sorted(set(methods))
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(short_method(name) for name in names[:most]) + more


# --------------------------------------------------------------------------- check


@dataclasses.dataclass(frozen=True)
class Verdict:
    level: int
    summary: str

    def line(self) -> str:
        return f"{('OK', 'WARNING', 'CRITICAL')[self.level]}: {self.summary}"


def judge(
    view: StatusView, config: Config, now: datetime, retrying: RetryingView | None = None
) -> Verdict:
    """The monitoring verdict from the status and ``[check]`` thresholds.

    Besides the counts, it warns on what the guide says a human must look at (``attention``),
    each with what to do; those are warnings, never critical.
    """
    c = config.check
    parked = view.counts.get(State.PARKED, 0)
    oldest = oldest_due_age(view, now) or 0.0  # thresholds are > 0: no due row never alarms
    live = [w for w in view.workers if liveness(w, now, c.heartbeat_stale) == "live"]
    waiting = view.counts.get(State.PENDING, 0) + view.counts.get(State.INFLIGHT, 0)
    gates = [w.gate for w in live]
    alarms = broken(view, live, config, now)
    notes = attention(live, retrying or RetryingView(), c, now)
    critical = (
        parked >= max(c.parked_critical, 1)
        or oldest >= c.oldest_due_critical
        or (not live and waiting > 0)
        or "unauthenticated" in gates
        or bool(alarms)
    )
    warning = (
        parked >= max(c.parked_warning, 1)
        or oldest >= c.oldest_due_warning
        or any(gate not in ("open", *TIMED_GATES) for gate in gates)
        or bool(notes)
    )
    level = CRITICAL if critical else WARNING if warning else OK
    summary = [check_summary(view, now, live, waiting), *alarms, *notes]
    return Verdict(level, "; ".join(summary))


def broken(
    view: StatusView, live: Sequence[WorkerView], config: Config, now: datetime
) -> list[str]:
    """What is broken now (critical), each with what to do: a job that keeps failing on a live
    worker, rows in flight whose lease ran out over a lease ago (issue 12)."""
    alarms = [failure_note(f, now, f" on {w.worker_id}") for w in live for f in w.failing_jobs]
    expired = expired_lease_note(
        view.leases_expired, view.oldest_lease_expired_at, now, config.worker.lease
    )
    return alarms + ([expired] if expired else [])


#: Gates ``judge`` times against a ``[check]`` threshold (``policy.Gate`` values; a test holds
#: them to it). Any other closed gate warns at once, as before.
ROLLOVER, MAINTENANCE = "rollover", "maintenance"
TIMED_GATES = (ROLLOVER, MAINTENANCE)
CHECK_MESSAGE_WIDTH = 160  # characters of a row's last message in the check line
REFUSED_ADVICE = (
    "check the API key's permissions (key_access in the protos, recrypt.net/api), "
    "then systemctl reload outbox"
)


def attention(
    live: Sequence[WorkerView], retrying: RetryingView, c: CheckConfig, now: datetime
) -> list[str]:
    """What a human must look at, one sentence each, with what to do (issue 10)."""
    notes = [_rollover_note(live, c, now), _maintenance_note(live, c, now), _refused_note(live)]
    return _closed_notes(live, now) + [n for n in notes if n] + _retrying_notes(retrying, c, now)


def _closed_notes(live: Sequence[WorkerView], now: datetime) -> list[str]:
    """Gates under which nothing is sent, other than the timed ones: say why, and what to do
    (the worker's gate reason says both)."""
    from outbox.gates import SENDS_NOTHING  # noqa: PLC0415 (gates load grpc: only for check)

    return [
        f"gate {w.gate} on {w.worker_id} "
        + (f"for {lasted((now - w.gate_since).total_seconds())}" if w.gate_since else "")
        + f": {w.gate_reason or 'see outbox status'}"
        for w in live
        if w.gate in SENDS_NOTHING and w.gate not in TIMED_GATES
    ]


def gate_age(live: Sequence[WorkerView], gate: str, now: datetime) -> float | None:
    """Seconds the longest-closed live worker in ``gate`` has had it closed; None if none is
    in it; ``math.inf`` if one does not say since when (a daemon older than migration 0006)."""
    ages = [
        math.inf if w.gate_since is None else (now - w.gate_since).total_seconds()
        for w in live
        if w.gate == gate
    ]
    return max(ages, default=None)


def _rollover_note(live: Sequence[WorkerView], c: CheckConfig, now: datetime) -> str | None:
    closed = gate_age(live, ROLLOVER, now)
    if closed is None or closed < c.rollover_warning:
        return None
    how_long = (
        "since an unknown time"
        if closed == math.inf
        else f"for {lasted(closed)}, over {threshold(c.rollover_warning)}"
    )
    return f"rollover (UNAVAILABLE vgw-db) {how_long}: check recrypt.net for a notice"


def _maintenance_note(live: Sequence[WorkerView], c: CheckConfig, now: datetime) -> str | None:
    closed = gate_age(live, MAINTENANCE, now)
    if closed is None or closed < c.maintenance_warning:
        return None
    paused = "for an unknown time" if closed == math.inf else lasted(closed)
    return f"Recrypt maintenance (PERMISSION_DENIED): paused {paused}; see https://x.com/RecryptCS"


def _refused_note(live: Sequence[WorkerView]) -> str | None:
    held = [method for w in live for method in w.refused_methods]
    if not held:
        return None
    return (
        f"Recrypt refused {method_names(held)} outside maintenance (PERMISSION_DENIED), "
        f"held: {REFUSED_ADVICE}"
    )


def _retrying_notes(r: RetryingView, c: CheckConfig, now: datetime) -> list[str]:
    notes = []
    if r.long:
        first = r.first_due_at
        oldest = f" (oldest {lasted((now - first).total_seconds())})" if first else ""
        since = f"retrying over {threshold(c.retrying_warning)} since first due"
        notes.append(f"{n_rows(r.long)} {since}{oldest}")
    if r.many:
        notes.append(
            f"{n_rows(r.many)} with {c.attempts_warning} or more attempts (most {r.most_attempts})"
        )
    if r.rows:
        notes += [_answer(r), "see outbox list --state pending"]
    return notes


def _answer(r: RetryingView) -> str:
    """The commonest last answer among the rows, with the start of one's message."""
    said = r.code or "no code"
    if r.message:
        said += f' "{clip(r.message, CHECK_MESSAGE_WIDTH)}"'
    if r.rows == 1:
        return f"its last answer: {said}"
    if r.code_rows == r.rows:
        return f"rows keep getting the same answer: {said}"
    return f"commonest last answer ({r.code_rows} of {r.rows} rows): {said}"


def threshold(seconds: float) -> str:
    """A configured duration as written: ``3 min`` when whole minutes, else ``90.5 s``."""
    return f"{seconds / 60:g} min" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g} s"


def check_summary(view: StatusView, now: datetime, live: Sequence[WorkerView], waiting: int) -> str:
    parked = view.counts.get(State.PARKED, 0)
    parts = [f"{parked} parked" + (f" ({_reasons(view.parked_by_reason)})" if parked else "")]
    oldest = oldest_due_age(view, now)
    parts.append("no due rows" if oldest is None else f"oldest due row {oldest:.0f} s")
    gates = sorted({w.gate for w in live})
    if live:
        noun = "worker" if len(live) == 1 else "workers"
        label = "gate" if len(gates) == 1 else "gates"
        parts.append(f"{len(live)} live {noun} ({label} {', '.join(gates)})")
    else:
        parts.append(f"no live worker ({waiting} rows pending or in flight)")
    return "; ".join(parts)


@main.command()
@pass_outbox
def check(obj: Outbox) -> None:
    """Monitoring: one line; exit 0 ok, 1 warning, 2 critical."""
    try:
        now, c = utcnow(), obj.config.check
        store = obj.store()
        retrying = store.retrying(now - timedelta(seconds=c.retrying_warning), c.attempts_warning)
        verdict = judge(store.status(now), obj.config, now, retrying)
    except Exception as exc:  # a probe answers CRITICAL, never a traceback
        summary = " ".join(describe_failure(exc, obj).split())  # one line, always
        verdict = Verdict(CRITICAL, f"cannot read the outbox: {summary}")
    click.echo(verdict.line())
    sys.exit(verdict.level)


# --------------------------------------------------------------------------- simulator, demo


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
    from outbox.demo import run_demo  # noqa: PLC0415 (the demo pulls in everything)

    sys.exit(run_demo())


main.add_command(console_group)

if __name__ == "__main__":  # pragma: no cover
    main()
