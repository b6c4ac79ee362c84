"""Configuration: TOML, validated at start; a bad value fails naming its key and the fix.

``config.example.toml`` documents every key with its default. Environment overrides:
``OUTBOX_DATABASE_URL`` and ``RECRYPT_API_KEY``. The API key may also come from
``[recrypt] api_key_file`` or from systemd credentials (``$CREDENTIALS_DIRECTORY/recrypt-api-key``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
import tomllib
from datetime import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from outbox.errors import ConfigError
from outbox.vocabulary import RecryptMethod

DEFAULT_TARGET = "api.recrypt.net:8443"
CREDENTIAL_NAME = "recrypt-api-key"
DEFAULT_HOLD_METHODS = (RecryptMethod.PLACE_ORDER.value, RecryptMethod.CANCEL_ORDER.value)

MAX_SECONDS = 1e9  # about 31 years: anything larger is a typo, and overflows datetime math
#: The guide: back off "upto 3 minutes; check the website for any system notifications if
#: still occurring after this".
DEFAULT_ROLLOVER_WARNING = 180.0
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
_DAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")
_WINDOW = re.compile(r"^(MON|TUE|WED|THU|FRI|SAT|SUN) (\d\d):(\d\d)-(\d\d):(\d\d)$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(_Section):
    url: str = Field("sqlite:///outbox.db", description="an SQLAlchemy URL")


class RecryptConfig(_Section):
    target: str = Field(DEFAULT_TARGET, description="host:port of the Recrypt gRPC API")
    tls: bool = Field(True, description="true, or false only for a loopback simulator")
    ca_file: str = Field("", description="a PEM CA bundle; empty uses the system trust store")
    api_key_file: str = Field("", description="a file holding the API key (mode 0600)")
    key_file_permissions: Literal["refuse", "warn"] = Field(
        "refuse", description='"refuse" or "warn" when the key file is group/world-readable'
    )
    proto_path: str = Field("", description="Recrypt's .proto directory or a descriptor set")
    deadline: Seconds = Field(10.0, description="per-call deadline in seconds")

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("must be host:port, e.g. api.recrypt.net:8443")
        return value


class WorkerConfig(_Section):
    batch_size: int = Field(100, gt=0, le=10_000, description="rows claimed per round trip")
    max_in_flight: int = Field(64, gt=0, le=10_000, description="gRPC calls in flight at once")
    poll_interval: Seconds = Field(1.0, description="seconds between polls when idle")
    lease: Seconds = Field(
        60.0, description="seconds a claim is held before another worker may take it"
    )
    notify: bool = Field(True, description="PostgreSQL: wake on LISTEN/NOTIFY (polling stays)")


class RetryConfig(_Section):
    initial_backoff: Seconds = Field(1.0, description="first retry delay in seconds")
    max_backoff: Seconds = Field(180.0, description="cap on the retry delay (the guide: 3 minutes)")
    multiplier: float = Field(2.0, ge=1.0, description="growth of the delay per attempt")
    jitter: float = Field(0.2, ge=0.0, le=1.0, description="fraction of the delay randomised")
    max_unknown_attempts: int = Field(
        10, gt=0, description="resends on an unknown outcome before the row is parked"
    )


class MaintenanceConfig(_Section):
    probe_interval: Seconds = Field(60.0, description="seconds between MaintenanceCheck polls")
    unauthenticated_probe_interval: Seconds = Field(
        300.0, description="seconds between re-probes while the API key is refused"
    )
    rollover_window: str = Field(
        "TUE 18:00-18:30", description='weekly UTC window as "DAY HH:MM-HH:MM", or "" for none'
    )
    hold_methods: tuple[str, ...] = Field(
        DEFAULT_HOLD_METHODS, description="gRPC paths held during the rollover window"
    )

    @field_validator("rollover_window")
    @classmethod
    def _window(cls, value: str) -> str:
        found = _WINDOW.match(value)
        if value and not found:
            raise ValueError('must look like "TUE 18:00-18:30" (UTC), or be "" for no window')
        if found:
            _day, h1, m1, h2, m2 = found.groups()
            try:
                start, end = time(int(h1), int(m1)), time(int(h2), int(m2))
            except ValueError:
                raise ValueError("has an impossible time; use 00:00 to 23:59 (UTC)") from None
            if end <= start:
                raise ValueError("must end after it starts, within the day (UTC)")
        return value

    def window(self) -> tuple[int, time, time] | None:
        """(weekday 0=Monday, start, end) in UTC, or None."""
        found = _WINDOW.match(self.rollover_window)
        if not found:
            return None
        day, h1, m1, h2, m2 = found.groups()
        return _DAYS.index(day), time(int(h1), int(m1)), time(int(h2), int(m2))


class StreamsConfig(_Section):
    accounts: tuple[str, ...] = Field(
        (), description="accounts whose order updates are followed; empty follows none"
    )
    method: str = Field(
        RecryptMethod.STREAM_ORDER_UPDATES.value,
        description="the server-streaming method to follow",
    )


class MetricsConfig(_Section):
    listen: str = Field("127.0.0.1:9464", description='host:port for /metrics, or "" to disable')


class LoggingConfig(_Section):
    format: Literal["text", "json"] = Field("text", description='"text" (key=value) or "json"')
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")


class RetentionConfig(_Section):
    days: float = Field(
        30.0, ge=0, le=36_500, description="finished rows older than this are purged; 0 never"
    )
    batch_size: int = Field(1000, gt=0, description="rows deleted per transaction")
    interval: Seconds = Field(3600.0, description="seconds between purge runs")
    tombstone_days: float = Field(
        400.0,
        ge=0,
        le=36_500,
        description="a purged row's key stays refused this many days after the purge; 0 for ever",
    )


class CheckConfig(_Section):
    parked_warning: int = Field(1, ge=0, description="parked rows for a warning")
    parked_critical: int = Field(50, ge=0, description="parked rows for critical")
    oldest_due_warning: Seconds = Field(300.0, description="age in seconds of the oldest due row")
    oldest_due_critical: Seconds = Field(1800.0, description="as above, for critical")
    heartbeat_stale: Seconds = Field(
        60.0, description="seconds after which a worker counts as dead"
    )
    # What the guide says a human must look at (warnings only; issue 10).
    rollover_warning: Seconds = Field(
        DEFAULT_ROLLOVER_WARNING,
        description="seconds a rollover gate may stay closed (the guide: 3 minutes, then "
        "check recrypt.net)",
    )
    maintenance_warning: float = Field(
        0.0,
        ge=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        description="seconds a maintenance pause lasts before a warning (0: at once)",
    )
    retrying_warning: Seconds = Field(
        1800.0, description="seconds since a retried pending row first became due"
    )
    attempts_warning: int = Field(
        10, gt=0, le=1_000_000, description="attempts of a pending row (a whole number, 1 or more)"
    )


class ReportConfig(_Section):
    """``outbox report``'s fallback for protos without the amount/currency marks."""

    amount_fields: dict[str, str] | tuple[str, ...] = Field(
        (),
        description='field names tried in every request (["amount"]), or one per method '
        '({ "/pkg.Service/Method" = "money.amount" })',
    )
    currency_fields: dict[str, str] | tuple[str, ...] = Field(
        (), description="as amount_fields, for the field naming the currency"
    )


DEFAULT_REDACTED = ("from_account", "to_account", "account")


class ConsoleConfig(_Section):
    """``outbox console``: the operator's web UI (README, "The console"; SECURITY.md)."""

    listen: str = Field("127.0.0.1:8765", description="host:port the console listens on")
    users_file: str = Field(
        "",
        description="the console's users (argon2 hashes); empty: console-users.json beside "
        "the config file",
    )
    session_secret_file: str = Field(
        "",
        description="a file holding the session-signing secret; empty: console-secret "
        "beside the config file, created (mode 0600) on first start",
    )
    trusted_proxy_header: str = Field(
        "",
        description="a header naming the user, set by a reverse proxy on this host "
        '(e.g. "X-Forwarded-User"); empty: log in with a password',
    )
    dual_control: bool = Field(
        False, description="true: cancelling a maybe-executed row needs a second operator"
    )
    redact_fields: tuple[str, ...] = Field(
        DEFAULT_REDACTED, description="payload field names shown as ••• in the console"
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError("must be host:port, e.g. 127.0.0.1:8765")
        return value

    @field_validator("trusted_proxy_header")
    @classmethod
    def _header(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9-]+", value):
            raise ValueError('must be a header name such as "X-Forwarded-User", or ""')
        return value


class Config(_Section):
    database: DatabaseConfig = DatabaseConfig()
    recrypt: RecryptConfig = RecryptConfig()
    worker: WorkerConfig = WorkerConfig()
    retry: RetryConfig = RetryConfig()
    maintenance: MaintenanceConfig = MaintenanceConfig()
    streams: StreamsConfig = StreamsConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    retention: RetentionConfig = RetentionConfig()
    check: CheckConfig = CheckConfig()
    report: ReportConfig = ReportConfig()
    console: ConsoleConfig = ConsoleConfig()
    api_key: SecretStr | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _lease_outlives_a_call(self) -> Config:
        if self.worker.lease <= self.recrypt.deadline:
            raise ValueError(
                f"[worker] lease ({self.worker.lease:g} s) must be longer than [recrypt] deadline "
                f"({self.recrypt.deadline:g} s), or another worker may resend a row still in flight"
            )
        return self

    @model_validator(mode="after")
    def _tombstones_outlast_rows(self) -> Config:
        days, tombstones = self.retention.days, self.retention.tombstone_days
        if days and tombstones and tombstones < days:
            raise ValueError(
                f"[retention] tombstone_days ({tombstones:g}) must be at least [retention] days "
                f"({days:g}): a purged key is refused for reuse while Recrypt may remember it, "
                "far longer than its row is kept (default 400)"
            )
        return self

    def require_api_key(self) -> SecretStr:
        if self.api_key is None or not self.api_key.get_secret_value():
            raise ConfigError(
                "no Recrypt API key: set RECRYPT_API_KEY, or [recrypt] api_key_file, or a "
                f"systemd credential named {CREDENTIAL_NAME} (LoadCredential=)"
            )
        return self.api_key


def load(
    path: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    *,
    with_key: bool = True,
) -> Config:
    """Read the TOML file (if any), apply environment overrides, resolve the API key.

    ``with_key=False`` (the read-only commands: they never call Recrypt) leaves the key alone:
    a missing or unreadable key file is then no error, and ``api_key`` stays None.
    """
    env = dict(os.environ) if env is None else env
    data = _read_toml(Path(path)) if path else {}
    if "api_key" in data or "api_key" in data.get("recrypt", {}):
        raise ConfigError(
            f"config file {path}: do not write the API key in the config file; put it in a "
            "file of its own (mode 0600) named by [recrypt] api_key_file, or RECRYPT_API_KEY"
        )
    if env.get("OUTBOX_DATABASE_URL") and isinstance(data.setdefault("database", {}), dict):
        data["database"]["url"] = env["OUTBOX_DATABASE_URL"]
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, path)) from None
    if not with_key:
        return config
    key = _api_key(config.recrypt, env)
    if key and not key.isprintable():
        raise ConfigError(
            "the API key holds a control character (a stray newline or tab inside it?); "
            "copy it again from recrypt.net/api"
        )
    if key and not key.isascii():
        # gRPC metadata values are printable ASCII: gRPC would refuse every call locally.
        raise ConfigError(
            "the API key holds a character that is not ASCII (a typographic quote or dash "
            "pasted with it?); gRPC can only send ASCII keys: copy it again from recrypt.net/api"
        )
    return config.model_copy(update={"api_key": SecretStr(key) if key else None})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; copy config.example.toml") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML (UTF-8): {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None


def _api_key(recrypt: RecryptConfig, env: dict[str, str]) -> str | None:
    if env.get("RECRYPT_API_KEY"):
        return env["RECRYPT_API_KEY"].strip()
    if recrypt.api_key_file:
        path = Path(recrypt.api_key_file)
        _check_private(path, recrypt.key_file_permissions)
        return _read_key_file(path, "[recrypt] api_key_file")
    credentials = env.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL_NAME).is_file():
        return _read_key_file(Path(credentials) / CREDENTIAL_NAME, "$CREDENTIALS_DIRECTORY")
    return None


def _check_private(path: Path, policy: str) -> None:
    """The key allows moving money: its file must be readable by its owner only."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # _read_key_file says what is wrong
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return
    message = (
        f"[recrypt] api_key_file: {path} is readable by group or others "
        f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`"
    )
    if policy == "refuse":
        raise ConfigError(message + ' (or set key_file_permissions = "warn")')
    logging.getLogger("outbox.config").warning(message)


def _read_key_file(path: Path, origin: str) -> str:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read {path}: {exc.strerror}") from None
    if not key:
        raise ConfigError(f"{origin}: {path} is empty; put the API key from recrypt.net/api in it")
    return key


def _explain(exc: ValidationError, path: str | os.PathLike[str] | None) -> str:
    where = f"config file {path}" if path else "configuration"
    lines = [f"{where} is invalid:"]
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if not loc:  # a rule across sections: its message names the keys
            lines.append(f"  {error['msg'].removeprefix('Value error, ')}")
            continue
        key = f"[{loc[0]}] {'.'.join(loc[1:])}" if len(loc) > 1 else loc[0]
        hint = _hint(loc)
        msg = "unknown key (a typo?)" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"  {key}: {msg}" + (f"; expected {hint}" if hint else ""))
    return "\n".join(lines)


def _hint(loc: list[str]) -> str:
    if len(loc) != 2:
        return ""
    section = Config.model_fields.get(loc[0])
    model = section.annotation if section else None
    if not isinstance(model, type) or not issubclass(model, BaseModel):
        return ""
    field = model.model_fields.get(loc[1])
    return field.description or "" if field else ""


def is_loopback(host: str) -> bool:
    """Judged from the address, never the spelling: ``127.evil.example`` is not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
