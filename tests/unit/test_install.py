"""``outbox init``, ``outbox systemd`` and ``outbox db roles --print``, without a database."""

from __future__ import annotations

import re
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from outbox.cli import main
from outbox.config import load
from outbox.install import UNIT_NAMES, data_file
from outbox.roles import BACKENDS, RoleNames, script
from outbox.schema import metadata

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env={"OUTBOX_CONFIG": None})
    return result.exit_code, result.output


def test_init_writes_the_commented_example_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"
    code, out = cli("init", str(path))
    assert code == 0, out
    assert path.read_text() == (ROOT / "config.example.toml").read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.write_text("# mine\n")
    code, out = cli("init", str(path))
    assert (
        code == 1
        and out
        == f"error: {path} exists: outbox never overwrites it; edit it, or move it away first\n"
    )
    assert path.read_text() == "# mine\n"


def test_init_fills_in_settings_and_checks_them(tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"
    url = "postgresql://outbox_daemon@127.0.0.1/payments"
    code, out = cli(
        "--config", str(path), "init", "--set", f"database.url={url}",
        "--set", "recrypt.tls=false", "--set", "worker.lease=90",
    )  # fmt: skip
    assert code == 0, out
    config = load(path, env={})
    assert (config.database.url, config.recrypt.tls, config.worker.lease) == (url, False, 90.0)
    assert "# An SQLAlchemy URL." in path.read_text()  # the comments stay


@pytest.mark.parametrize(
    ("setting", "names"),
    [
        ("worker.leese=90", "--set 'worker.leese=90': write SECTION.KEY=VALUE"),
        ("database.url", "--set 'database.url': write SECTION.KEY=VALUE"),
        ("worker.lease=soon", "[worker] lease takes a float"),
        ("worker.lease=-1", "[worker] lease: "),
    ],
)
def test_init_refuses_a_bad_setting_naming_it(tmp_path: Path, setting: str, names: str) -> None:
    path = tmp_path / "outbox.toml"
    code, out = cli("init", str(path), "--set", setting)
    assert code == 1 and names in out, out
    assert not path.exists()


def test_systemd_units_name_this_venv_and_the_config(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "outbox.toml"
    code, out = cli("--config", str(config), "systemd", "--print")
    assert code == 0, out
    outbox = Path(sys.executable).parent / "outbox"
    assert f"ExecStart={outbox} --config {config} run\n" in out
    assert f"ExecStart={outbox} --config {config} check\n" in out
    assert f"ExecStart={outbox} --config {config} console\n" in out
    [doc] = set(re.findall(r"^Documentation=file://(.*)$", out, re.MULTILINE))
    assert Path(doc) == data_file("docs/operations.md").resolve() and Path(doc).is_file()
    assert "/opt/outbox/.venv/bin/outbox" not in out and "/etc/outbox/outbox.toml" not in out
    units = tmp_path / "units"
    units.mkdir()
    code, out = cli("--config", str(config), "systemd", "--dir", str(units))
    assert code == 0, out
    assert sorted(p.name for p in units.iterdir()) == sorted(UNIT_NAMES)
    code, out = cli("--config", str(config), "systemd", "--dir", str(units))
    assert code == 1 and "pass --force" in out
    assert cli("--config", str(config), "systemd", "--dir", str(units), "--force")[0] == 0


def test_systemd_needs_the_config_path() -> None:
    code, out = cli("systemd", "--print")
    assert code == 1 and "pass --config PATH" in out


@pytest.mark.parametrize("backend", sorted(set(BACKENDS.values())))
def test_every_table_is_granted_to_every_role(backend: str) -> None:
    """A new table in the schema fails here until the scripts grant it (names defined once
    in outbox.schema; the scripts are what a DBA reads)."""
    names = RoleNames(database="payments")
    grants = script(backend, names, grants=True)
    tables = [*metadata.tables, "alembic_version"]
    for table in tables:
        for role in ("reader", "operator"):
            assert re.search(rf"SELECT[^;]*{table}[^;]*TO[^;]*outbox_{role}\b", grants), (
                table,
                role,
            )
    if backend == "mariadb":  # the owner's rights are per table there
        roles = script(backend, names, grants=False)
        for table in tables:
            assert f"ALL PRIVILEGES ON `payments`.`{table}` TO 'outbox_owner'" in roles


def test_db_roles_prints_the_scripts_and_refuses_bad_names() -> None:
    for backend in BACKENDS:
        for grants in ([], ["--grants"]):
            code, out = cli(
                "db", "roles", "--print", "--backend", backend, "--database", "pay", *grants
            )
            assert code == 0 and out == script(backend, RoleNames("pay"), grants=bool(grants))
    code, out = cli("db", "roles", "--print", "--backend", "postgresql", "--database", "p; DROP")
    assert code == 1 and out.startswith("error: --database 'p; DROP': write a plain name")
    code, out = cli("db", "roles", "--print")  # the default URL is SQLite
    assert code == 1 and "the [database] url names 'sqlite'" in out
    code, out = cli("db", "roles", "--backend", "mariadb", "--database", "pay")
    assert code == 1 and "pass --print" in out
