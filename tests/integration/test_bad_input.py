"""Bad input everywhere ends in a clear error or a parked row, never a crash (SPEC §3, §6, §7).

- rows written by plain SQL with bad keys, methods and payloads are parked ``bad_row`` with a
  message that names the problem, and a good row of the same batch commits;
- config files, generated and targeted, fail with ``ConfigError`` naming the key (or saying
  the TOML is invalid), never another exception, never showing the API key;
- command-line arguments fail with exit 1 or 2 and one error line, never a traceback.
"""

from __future__ import annotations

import json
import math
import tomllib
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from outbox.cli import main
from outbox.config import Config, load
from outbox.errors import ConfigError
from outbox.schema import attempts, messages
from outbox.simulator import GET_BALANCES, STREAM_ORDER_UPDATES, TRANSFER
from outbox.store import Store

SECRET = "sekret-MARKER-9f8e7d"
GOOD = {"fromAccount": "acc-1", "toAccount": "acc-2", "amount": "1.00", "currency": "AUD"}
INSERT = sa.text(
    "INSERT INTO outbox_messages (idempotency_key, method, payload, lane, reference, traceparent) "
    "VALUES (:k, :m, :p, :l, :r, :t)"
)
FEW = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --------------------------------------------------------------------------- rows


def _key() -> str:
    return str(uuid.uuid4())


def _unicode(min_size: int = 0, max_size: int = 20) -> st.SearchStrategy[str]:
    """Any text PostgreSQL can store too (no NUL; surrogates are never generated)."""
    return st.text(
        st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]),
        min_size=min_size,
        max_size=max_size,
    )


TRANSFER_FIELDS = {
    "idempotency_key",
    "idempotencyKey",
    "from_account",
    "fromAccount",
    "to_account",
    "toAccount",
    "amount",
    "currency",
    "memo",
}
SCALARS = st.one_of(  # JSON values only: no NaN or Infinity, which jsonb rightly refuses
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    _unicode(max_size=8),
)
NOT_A_STRING = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(SCALARS, max_size=3),
    st.dictionaries(_unicode(max_size=5), SCALARS, max_size=3),
)


@st.composite
def bad_rows(draw: st.DrawFn) -> tuple[str, str, str, str]:
    """(key, method, payload JSON text, what last_message must say) for a row never sendable."""
    kind = draw(st.sampled_from(["key", "method", "wrong_type", "unknown_field", "not_object"]))
    key, method, payload = _key(), TRANSFER, json.dumps(GOOD)
    if kind == "key":
        good = _key()
        key = draw(
            st.sampled_from(
                [
                    good.upper(),
                    "{" + good + "}",
                    good.replace("-", ""),
                    "urn:uuid:" + good,
                    good[:8],
                    " " + good,
                    good.replace("a", "\uff41") if "a" in good else good[:35] + "\u00e9",
                    "",
                ]
            )
        )
        says = "lowercase UUID"
    elif kind == "method":
        method = draw(
            st.one_of(
                st.sampled_from(
                    [
                        "",
                        TRANSFER[1:],  # no leading slash
                        TRANSFER.upper(),
                        TRANSFER + " ",
                        "/" + "x" * 254,
                        "/recrypt.wallet.v1.Wallet/Tränsfer",
                        GET_BALANCES,  # read-only: no idempotency key
                        STREAM_ORDER_UPDATES,  # a server stream
                    ]
                ),
                _unicode(max_size=40).filter(lambda m: m != TRANSFER),
            )
        )
        says = "method"
    elif kind == "wrong_type":
        field = draw(st.sampled_from(["amount", "fromAccount", "to_account", "currency", "memo"]))
        payload = json.dumps(
            GOOD | {field: draw(NOT_A_STRING)}, ensure_ascii=False, allow_nan=False
        )
        says = "does not parse"
    elif kind == "unknown_field":
        name = draw(_unicode(min_size=1).filter(lambda n: n not in TRANSFER_FIELDS))
        value = draw(st.one_of(SCALARS, NOT_A_STRING))
        payload = json.dumps(GOOD | {name: value}, ensure_ascii=False, allow_nan=False)
        says = "does not parse"
    else:
        value = draw(
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                _unicode(),
                st.recursive(st.lists(SCALARS, max_size=3), lambda xs: st.lists(xs, max_size=3)),
            )
        )
        payload = json.dumps(value, ensure_ascii=False, allow_nan=False)
        says = "JSON object"
    return key, method, payload, says


def _empty(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(attempts.delete())
        conn.execute(messages.delete())


def _insert(
    engine: Engine,
    key: str,
    method: str,
    payload: str,
    *,
    lane: str | None = None,
    reference: str | None = None,
    traceparent: str | None = None,
) -> None:
    params = {"k": key, "m": method, "p": payload, "l": lane, "r": reference, "t": traceparent}
    with engine.begin() as conn:
        conn.execute(INSERT, params)


def _assert_parked_bad_row(store: Store, key: str, says: str) -> None:
    row = store.get(key)
    assert (row.state, row.park_reason, row.attempts) == ("parked", "bad_row", 0), row
    assert row.lease_owner is None
    message = row.last_message or ""
    # A payload can be wrong in two ways at once; the check that runs first names its problem.
    both_spellings = "write the field once" in message and says == "does not parse"
    assert says.lower() in message.lower() or both_spellings, message
    assert "Traceback" not in message
    assert 'File "' not in message


def test_generated_bad_rows_are_parked_and_the_good_row_commits(
    engine: Engine, store: Store, make_dispatcher: Callable[..., Any]
) -> None:
    dispatcher = make_dispatcher()

    @FEW
    @given(st.lists(bad_rows(), min_size=1, max_size=4, unique_by=lambda r: r[0]), _unicode())
    def check(rows: list[tuple[str, str, str, str]], text: str) -> None:
        _empty(engine)
        for key, method, payload, _says in rows:
            _insert(engine, key, method, payload, lane=None, reference=text or None)
        good = _key()
        body = json.dumps(GOOD | {"memo": text}, ensure_ascii=False)
        # any text in the writer's traceparent column: a hint, never a reason to fail
        texts = {"lane": text or None, "reference": text or None, "traceparent": text or None}
        _insert(engine, good, TRANSFER, body, **texts)
        report = dispatcher.run_once()  # never raises
        assert report.claimed == len(rows) + 1
        for key, _method, _payload, says in rows:
            _assert_parked_bad_row(store, key, says)
        assert store.get(good).state == "committed"

    check()


def test_text_that_is_not_json(
    engine: Engine, backend: str, store: Store, make_dispatcher: Callable[..., Any]
) -> None:
    """Every database refuses it at the writer (SQLite through migration 0005's trigger),
    except text SQLite's NUMERIC affinity turns into a number first (``1.``): that row is
    stored, and parked by the daemon."""
    dispatcher = make_dispatcher()

    @FEW
    @given(_unicode(min_size=1, max_size=40).filter(lambda t: not _is_json(t)))
    def check(text: str) -> None:
        _empty(engine)
        bad = _key()
        if backend != "sqlite":
            with pytest.raises(sa.exc.DBAPIError):
                _insert(engine, bad, TRANSFER, text)
            return
        try:
            _insert(engine, bad, TRANSFER, text)
        except sa.exc.IntegrityError as refused:
            assert "payload: not JSON" in str(refused.orig)
            return
        good = _key()
        _insert(engine, good, TRANSFER, json.dumps(GOOD))
        dispatcher.run_once()
        _assert_parked_bad_row(store, bad, "not valid JSON")
        assert store.get(good).state == "committed"

    check()


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_a_huge_payload_is_sent_or_parked(
    engine: Engine, store: Store, make_dispatcher: Callable[..., Any]
) -> None:
    big, bad = _key(), _key()
    _insert(engine, big, TRANSFER, json.dumps(GOOD | {"memo": "m" * 1_000_000}))
    _insert(engine, bad, TRANSFER, json.dumps(GOOD | {"x" * 1000: "y" * 1_000_000}))
    good = _key()
    _insert(engine, good, TRANSFER, json.dumps(GOOD))
    make_dispatcher().run_once()
    assert store.get(big).state in ("committed", "parked")
    _assert_parked_bad_row(store, bad, "no field named")
    assert store.get(good).state == "committed"


@pytest.mark.parametrize(
    "case",
    [
        "null",
        "[]",
        "[[1, [2, [3, []]]]]",
        '"a string"',
        "0",
        '{"amount": {"nested": [[["deep"]]]}}',
        '{"idempotencyKey": "6f1c2b44-0c47-4c55-9b65-2f0c7c3a9d10"}',
    ],
)
def test_null_and_odd_json_payloads(
    case: str, engine: Engine, store: Store, make_dispatcher: Callable[..., Any]
) -> None:
    bad, good = _key(), _key()
    _insert(engine, bad, TRANSFER, case)
    _insert(engine, good, TRANSFER, json.dumps(GOOD))
    make_dispatcher().run_once()
    row = store.get(bad)
    assert (row.state, row.park_reason) == ("parked", "bad_row")
    assert "Traceback" not in (row.last_message or "")
    assert store.get(good).state == "committed"


def test_deeply_nested_json_is_parked_not_a_poison_pill(
    request: pytest.FixtureRequest,
    engine: Engine,
    backend: str,
    store: Store,
    make_dispatcher: Callable[..., Any],
) -> None:
    """A payload nested deeper than Python's recursion limit (valid JSON for jsonb)."""
    deep = '{"memo": ' + "[" * 5000 + "]" * 5000 + "}"
    bad, good = _key(), _key()
    if backend in ("mariadb", "sqlite"):  # their JSON checks stop early: refused at the writer
        with pytest.raises(sa.exc.DBAPIError):
            _insert(engine, bad, TRANSFER, deep)
        return
    _insert(engine, bad, TRANSFER, deep)
    _insert(engine, good, TRANSFER, json.dumps(GOOD))
    make_dispatcher().run_once()
    _assert_parked_bad_row(store, bad, "JSON")
    assert store.get(good).state == "committed"


def test_a_payload_with_both_spellings_of_a_field_is_parked(
    engine: Engine, store: Store, make_dispatcher: Callable[..., Any], sim: Any
) -> None:
    bad = _key()
    payload = '{"toAccount": "acc-2", "to_account": "attacker", "fromAccount": "acc-1", '
    payload += '"amount": "1.00", "currency": "AUD"}'
    _insert(engine, bad, TRANSFER, payload)
    make_dispatcher().run_once()
    assert sim.executed_keys() == set()
    _assert_parked_bad_row(store, bad, "toAccount")


# --------------------------------------------------------------------------- config

KNOWN = {
    name: sorted(field.annotation.model_fields)  # type: ignore[union-attr]
    for name, field in Config.model_fields.items()
    if name != "api_key"
}
TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([-1, 0, 10**18, -(10**18)]),
    st.floats(),  # inf and nan too
    st.sampled_from([-1.5, 0.0, 1e300, -1e300, 5e-324]),
    _unicode(max_size=12),
    st.just(SECRET),
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "url", "lease"]), inner, max_size=2),
    ),
    max_leaves=4,
)


def toml_value(value: Any) -> str:
    """A TOML literal for a generated value (strings in JSON's escapes, which TOML shares)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and not math.isfinite(value):
        text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    elif isinstance(value, int | float):
        text = repr(value)
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, list):
        text = "[" + ", ".join(toml_value(v) for v in value) + "]"
    else:
        items = (f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        text = "{" + ", ".join(items) + "}"
    return text


@st.composite
def config_documents(draw: st.DrawFn) -> tuple[str, set[str]]:
    """A TOML document over known and unknown sections and keys; returns it and its names."""
    sections = draw(st.lists(st.sampled_from([*KNOWN, "bogus", "Worker"]), max_size=3, unique=True))
    names: set[str] = set()
    lines: list[str] = []
    top = draw(st.sampled_from([None, "api_key", "lease", "unknown"]))
    if top:
        names.add(top)
        lines.append(f"{top} = {toml_value(draw(TOML_VALUES))}")
    for section in sections:
        names.add(section)
        lines.append(f"[{section}]")
        keys = draw(
            st.lists(
                st.sampled_from([*KNOWN.get(section, []), "typo_key", "Lease"]),
                min_size=1,
                max_size=3,
                unique=True,
            )
        )
        for key in keys:
            names.add(key)
            lines.append(f"{key} = {toml_value(draw(TOML_VALUES))}")
    return "\n".join(lines) + "\n", names


def _names(value: Any) -> set[str]:
    """Every key of a parsed TOML document, at any depth."""
    if isinstance(value, list):
        return set().union(*map(_names, value)) if value else set()
    if isinstance(value, dict):
        return set(value) | (set().union(*map(_names, value.values())) if value else set())
    return set()


def _load_checked(path: Path, names: set[str]) -> Config | None:
    """``load``: a Config or a ConfigError naming a key; any other exception fails the test."""
    try:
        return load(path, env={"RECRYPT_API_KEY": SECRET})
    except ConfigError as exc:
        message = str(exc)
        assert SECRET not in message
        assert "Traceback" not in message
        if "is not valid TOML" not in message:
            assert message.startswith(f"config file {path}"), message
            assert any(name in message for name in names), message
        return None


def test_generated_config_documents_fail_only_with_config_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"

    @FEW
    @given(config_documents())
    def check(document: tuple[str, set[str]]) -> None:
        text, names = document
        path.write_text(text, encoding="utf-8")
        config = _load_checked(path, names)
        if config is not None:
            assert config.api_key is not None
            assert config.api_key.get_secret_value() == SECRET
            assert SECRET not in repr(config)

    check()


def test_arbitrary_text_fails_only_with_config_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"

    @FEW
    @given(st.one_of(_unicode(max_size=80), st.sampled_from(["[worker", "a = ", "= 1", "[[x]]"])))
    def check(text: str) -> None:
        path.write_text(text, encoding="utf-8")
        try:
            names = _names(tomllib.loads(text))
        except tomllib.TOMLDecodeError:
            names = set()
        _load_checked(path, names)

    check()


BAD_VALUES = [
    ("worker", "batch_size", "0"),
    ("worker", "batch_size", "-5"),
    ("worker", "batch_size", "1.5"),
    ("worker", "batch_size", "99999999999999999999"),
    ("worker", "max_in_flight", '"many"'),
    ("worker", "poll_interval", "-1.0"),
    ("worker", "poll_interval", "nan"),
    ("worker", "lease", "inf"),
    ("worker", "notify", '"maybe"'),
    ("recrypt", "deadline", "0"),
    ("recrypt", "deadline", "[]"),
    ("recrypt", "target", '"no-port"'),
    ("recrypt", "target", "8443"),
    ("recrypt", "tls", "{}"),
    ("recrypt", "key_file_permissions", '"ignore"'),
    ("retry", "multiplier", "0.5"),
    ("retry", "jitter", "2"),
    ("retry", "max_unknown_attempts", "0"),
    ("retry", "initial_backoff", "-0.1"),
    ("maintenance", "rollover_window", '"sometime"'),
    ("maintenance", "hold_methods", "[1, 2]"),
    ("maintenance", "hold_methods", '"/x"'),
    ("logging", "level", '"LOUD"'),
    ("logging", "format", "1"),
    ("retention", "days", "-1"),
    ("retention", "batch_size", "0"),
    ("check", "parked_warning", "-1"),
    ("metrics", "listen", "[]"),
    ("database", "url", "5"),
    ("bogus", "key", "1"),
    ("worker", "bogus", "1"),
]


@pytest.mark.parametrize(("section", "key", "value"), BAD_VALUES)
def test_each_bad_value_names_its_key(section: str, key: str, value: str, tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"
    path.write_text(f"[{section}]\n{key} = {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(path, env={"RECRYPT_API_KEY": SECRET})
    message = str(caught.value)
    assert SECRET not in message
    assert (f"[{section}] {key}" in message) or (section == "bogus" and "bogus" in message), message


@pytest.mark.parametrize(
    "text",
    ["[worker\n", "x = \n", "a = 1\na = 2\n", "[worker]\nlease = 1\n[worker]\n", "key = 'x\n"],
)
def test_invalid_toml_says_so(text: str, tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load(path, env={"RECRYPT_API_KEY": SECRET})


def test_lease_not_longer_than_deadline_names_both(tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"
    path.write_text("[worker]\nlease = 5\n[recrypt]\ndeadline = 5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[worker\] lease .* \[recrypt\] deadline"):
        load(path, env={"RECRYPT_API_KEY": SECRET})


@pytest.mark.parametrize("what", ["directory", "not_utf8"])
def test_unreadable_config_file_is_a_config_error(what: str, tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"
    if what == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe[worker]\nlease = 60\n")
    with pytest.raises(ConfigError, match=r"outbox\.toml"):
        load(path, env={"RECRYPT_API_KEY": SECRET})


def test_rollover_window_with_impossible_times_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"
    path.write_text('[maintenance]\nrollover_window = "TUE 25:00-26:61"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[maintenance\] rollover_window"):
        load(path, env={"RECRYPT_API_KEY": SECRET})


@pytest.mark.parametrize(
    ("section", "key"),
    [("worker", "poll_interval"), ("maintenance", "probe_interval"), ("retention", "days")],
)
def test_huge_durations_are_refused_or_usable(section: str, key: str, tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"
    path.write_text(f"[{section}]\n{key} = 1e300\n", encoding="utf-8")
    try:
        config = load(path, env={"RECRYPT_API_KEY": SECRET})
    except ConfigError as exc:
        assert f"[{section}] {key}" in str(exc)
        return
    seconds = getattr(getattr(config, section), key) * (86400 if key == "days" else 1)
    timedelta(seconds=seconds)  # what the daemon does with it


def test_database_not_a_table_with_the_url_in_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"
    path.write_text('database = "sqlite:///x.db"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="database"):
        load(path, env={"RECRYPT_API_KEY": SECRET, "OUTBOX_DATABASE_URL": "sqlite:///y.db"})


# --------------------------------------------------------------------------- command line


class Cli:
    def __init__(self, url: str) -> None:
        self.env: dict[str, str | None] = {
            "OUTBOX_DATABASE_URL": url,
            "RECRYPT_API_KEY": SECRET,
            "OUTBOX_CONFIG": None,
            "COLUMNS": "100",
        }

    def fails(self, *args: str) -> Result:
        """The command fails cleanly: exit 1 or 2, no traceback, no key shown."""
        result = CliRunner().invoke(main, list(args), env=self.env)
        output = result.stdout + result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            args,
            repr(result.exception),
        )
        assert result.exit_code in (1, 2), (args, result.exit_code, output)
        assert "Traceback" not in output
        assert SECRET not in output
        assert result.stderr.strip(), args  # says what is wrong
        return result


@pytest.fixture
def cli(sqlite_url: str) -> Cli:
    return Cli(sqlite_url)


KEY = "6f1c2b44-0c47-4c55-9b65-2f0c7c3a9d10"
BODY = json.dumps(GOOD)
TARGETED = [
    ("enqueue", TRANSFER, "--json", "{not json"),
    ("enqueue", TRANSFER, "--json", ""),
    ("enqueue", TRANSFER, "--json", "[1, 2]"),
    ("enqueue", TRANSFER, "--json", "null"),
    ("enqueue", TRANSFER, "--json", '{"amount": 10.5}'),
    ("enqueue", TRANSFER, "--json", "@/nonexistent/payload.json"),
    ("enqueue", TRANSFER, "--json", "@/"),
    ("enqueue", TRANSFER),
    ("enqueue", TRANSFER, "--json", BODY, "--not-before", "tomorrow"),
    ("enqueue", TRANSFER, "--json", BODY, "--not-before", "2030-01-01T00:00:00"),
    ("enqueue", TRANSFER, "--json", BODY, "--expires-at", "2030-13-45T99:00:00Z"),
    ("enqueue", TRANSFER, "--json", BODY, "--expires-at", ""),
    ("enqueue", TRANSFER, "--json", BODY, "--key", KEY.upper()),
    ("enqueue", TRANSFER, "--json", BODY, "--key", "{" + KEY + "}"),
    ("enqueue", "/recrypt.wallet.v1.Wallet/Teleport", "--json", BODY),
    ("enqueue", TRANSFER[1:], "--json", BODY),
    ("enqueue", "", "--json", BODY),
    ("enqueue", GET_BALANCES, "--json", "{}"),
    ("list", "--limit", "0"),
    ("list", "--limit", "-3"),
    ("list", "--limit", "ten"),
    ("list", "--limit", "1e3"),
    ("list", "--limit", ""),
    ("list", "--state", "done"),
    ("list", "--state", "PENDING"),
    ("list", "--state", ""),
    ("show", "no-such-key"),
    ("show", KEY),
    ("show",),
    ("requeue", KEY, "--reason", "why"),
    ("requeue", KEY),
    ("requeue", KEY, "--reason", "   "),
    ("cancel", "junk", "--reason", "why", "--force"),
    ("cancel", KEY, "--reason", ""),
    ("nosuchcommand",),
]


@pytest.mark.parametrize("args", TARGETED, ids=[" ".join(a)[:50] for a in TARGETED])
def test_bad_arguments_fail_cleanly(args: tuple[str, ...], cli: Cli) -> None:
    cli.fails(*args)


JUNK = _unicode(max_size=30)


def test_fuzzed_arguments_fail_cleanly(cli: Cli) -> None:
    methods = JUNK.filter(lambda m: m != TRANSFER and not m.startswith("-"))
    commands = st.one_of(
        st.tuples(st.just("enqueue"), methods, st.just("--json"), JUNK),
        st.tuples(
            st.just("enqueue"),
            st.just(TRANSFER),
            st.just("--json"),
            st.just(BODY),
            st.sampled_from(["--not-before", "--expires-at", "--key"]),
            JUNK.filter(lambda t: not t.startswith("-")),
        ),
        st.tuples(
            st.just("list"),
            st.just("--limit"),
            st.one_of(st.integers(max_value=0).map(str), JUNK.filter(lambda t: not t.isdigit())),
        ),
        st.tuples(
            st.just("list"),
            st.just("--state"),
            JUNK.filter(lambda s: s not in {"pending", "inflight", "committed", "parked"}),
        ),
        st.tuples(st.sampled_from(["show", "requeue", "cancel"]), JUNK, st.just("--reason=r")),
    )

    @FEW
    @given(commands)
    def check(args: tuple[str, ...]) -> None:
        if args[0] == "show":
            args = args[:2]
        if args[:2] == ("list", "--state") and args[2] in {"cancelled", "expired"}:
            return
        if len(args) == 6 and args[4] == "--key" and _is_lowercase_uuid(args[5]):
            return
        cli.fails(*args)

    check()


def _is_lowercase_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def test_deeply_nested_json_argument_fails_cleanly(cli: Cli) -> None:
    cli.fails("enqueue", TRANSFER, "--json", "[" * 5000 + "]" * 5000)


def test_config_file_not_utf8_fails_cleanly(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"
    path.write_bytes(b"\xff\xfe[worker]\n")
    cli.fails("--config", str(path), "list")
