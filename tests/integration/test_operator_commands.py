"""Read-only commands need no API key; ``db current`` fails off head; every bad database URL
is one line naming ``[database] url`` and the fix (issue 12). The real command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy.engine import Engine, make_url

from outbox.cli import main
from outbox.database import normalise_url
from outbox.errors import ConfigError

READ_ONLY = (("status",), ("list",), ("check",), ("db", "current"))


def run(*args: str, code: int, **env: str | None) -> Result:
    base: dict[str, str | None] = {"RECRYPT_API_KEY": None, "OUTBOX_CONFIG": None}
    result = CliRunner().invoke(main, list(args), env=base | env)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), output
    assert result.exit_code == code, output
    return result


def missing_key_config(tmp_path: Path, url: str) -> str:
    path = tmp_path / "outbox.toml"
    path.write_text(
        f'[database]\nurl = "{url}"\n[recrypt]\napi_key_file = "{tmp_path}/absent-key"\n'
    )
    return str(path)


@pytest.mark.parametrize("args", READ_ONLY, ids=" ".join)
def test_read_only_commands_run_without_the_api_key_file(
    args: tuple[str, ...], db_url: str, tmp_path: Path
) -> None:
    config = missing_key_config(tmp_path, db_url)
    result = run("--config", config, *args, code=0)
    assert "api_key" not in result.stdout + result.stderr


def test_show_runs_without_the_api_key_file(db_url: str, tmp_path: Path) -> None:
    config = missing_key_config(tmp_path, db_url)
    result = run("--config", config, "show", "00000000-0000-0000-0000-000000000000", code=1)
    assert "api_key" not in result.stderr and "no outbox row" in result.stderr


def test_run_still_names_the_missing_key_file(db_url: str, tmp_path: Path) -> None:
    config = missing_key_config(tmp_path, db_url)
    result = run("--config", config, "run", code=1)
    assert "[recrypt] api_key_file" in result.stderr and "absent-key" in result.stderr


# --------------------------------------------------------------------------- db current


def test_db_current_exits_non_zero_off_head_and_says_what_to_do(
    fresh_empty_url, backend: str
) -> None:
    url = fresh_empty_url(backend)
    if backend == "sqlite":  # an empty file: a database with no outbox tables
        Path(make_url(url).database or "").touch()
    result = run("db", "current", code=1, OUTBOX_DATABASE_URL=url)
    assert "at head:  no: run `outbox db upgrade`" in result.stdout
    assert "outbox db upgrade" in result.stderr


def test_db_current_exits_zero_at_head(engine: Engine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    result = run("db", "current", code=0, OUTBOX_DATABASE_URL=url)
    assert "at head:  yes" in result.stdout


# --------------------------------------------------------------------------- database URLs


@pytest.mark.parametrize("args", [("status",), ("db", "upgrade"), ("check",)], ids=" ".join)
@pytest.mark.parametrize("url", ["outbox.db", "localhost/outbox", "postgres//x"])
def test_a_url_without_a_scheme_is_one_line_naming_the_key(args: tuple[str, ...], url: str) -> None:
    result = run(*args, code=2 if args == ("check",) else 1, OUTBOX_DATABASE_URL=url)
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1, output
    assert "[database] url" in output and "sqlite:///" in output


@pytest.mark.parametrize(
    ("written", "driver"),
    [
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg"),
        ("postgres://u@h/db", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
        ("mysql+mysqldb://u@h/db", "mysql+pymysql"),
        ("mysql+mysqlconnector://u@h/db", "mysql+pymysql"),
        ("mariadb+mariadbconnector://u@h/db", "mariadb+pymysql"),
        ("mysql://u@h/db", "mysql+pymysql"),
        ("sqlite+pysqlite:///x.db", "sqlite+pysqlite"),
    ],
)
def test_common_driver_spellings_use_our_drivers(written: str, driver: str) -> None:
    assert normalise_url(written).drivername == driver


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("postgresql+asyncpg://u@h/db", "postgresql://"),
        ("mysql+aiomysql://u@h/db", "mysql://"),
        ("oracle://u@h/db", "sqlite, postgresql or mysql/mariadb"),
        ("", "sqlite:///"),
    ],
)
def test_other_drivers_are_refused_saying_what_to_write(url: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        normalise_url(url)
    assert str(caught.value).startswith("[database] url") and named in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


def test_a_psycopg2_url_reaches_the_database(postgres_url: str) -> None:
    written = make_url(postgres_url).set(drivername="postgresql+psycopg2")
    url = written.render_as_string(hide_password=False)
    result = run("db", "current", code=0, OUTBOX_DATABASE_URL=url)
    assert "at head:  yes" in result.stdout


def test_a_mysqldb_url_reaches_the_database(mariadb_url: str) -> None:
    written = make_url(mariadb_url).set(drivername="mysql+mysqldb")
    url = written.render_as_string(hide_password=False)
    result = run("db", "current", code=0, OUTBOX_DATABASE_URL=url)
    assert "at head:  yes" in result.stdout
