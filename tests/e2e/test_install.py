"""The runbook's install (docs/operations.md, section 1), from the built wheel, on PostgreSQL
and MariaDB: every block marked ``install-test`` runs as written, with the paths moved under a
scratch directory (``Moves``) and only the lines that need root or a running systemd skipped.

The wheel is built once and installed once per session, into a venv outside the checkout
(the runbook's first block); each backend then runs the rest: roles, ``db upgrade`` as the
owner, grants, ``outbox init``, the key, ``outbox systemd``. The daemon is then started as the
written unit's ``ExecStart=`` says (its credential directory made by hand, as
``LoadCredential=`` would), a writer enqueues through the installed package as the writer role,
and the CLI reads as the reader role, all against the installed ``outbox simulator``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from outbox.database import make_engine
from outbox.roles import RoleNames
from outbox.store import Store
from tests.conftest import SERVER_URLS, _drop_database, require_server
from tests.e2e.roles import ROLE_BACKENDS, client_command, drop_roles
from tests.e2e.test_process import wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "operations.md"
API_KEY = "install-test-api-key-5c1d"
WHEEL_IN_RUNBOOK = "/path/to/recrypt_outbox-0.1.0-py3-none-any.whl"
#: Lines that need root or a running systemd: a real host runs them, this test cannot.
SKIPPED = ("apt-get ", "useradd ", "chgrp ", "systemctl ", "$EDITOR ")
PASSWORD = "0123456789abcdef0123456789abcdef"  # what `openssl rand -hex 16` would print
TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"
NEXT_CENTURY = ("--not-before", "2100-01-01T00:00:00Z")


def marked_blocks() -> list[tuple[str, str]]:
    """(part, text) of each ``sh`` block of section 1 marked ``<!-- install-test: PART -->``."""
    text = RUNBOOK.read_text("utf-8")
    section = text[text.index("## 1. Install") : text.index("## 2. Configure")]
    return re.findall(r"<!-- install-test: (\w+) -->\n```sh\n(.*?)```", section, re.DOTALL)


def shell_steps(blocks: list[str]) -> str:
    """The blocks as one script, without the lines that need root or systemd."""
    lines = "".join(blocks).splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith(SKIPPED)) + "\n"


def blocks_for(backend: str) -> list[str]:
    """Section 1's blocks for ``backend`` in the order they appear, the first one (the code,
    installed once per session) left out."""
    return [body for name, body in marked_blocks()[1:] if name in ("common", backend)]


class Moves:
    """What the test changes in the runbook's text: scratch paths, this server, test names."""

    def __init__(self, venv_root: Path, root: Path, backend: str, names: RoleNames) -> None:
        admin = shlex.join(client_command(backend)[0][: -2 if backend == "postgresql" else None])
        server = make_url(SERVER_URLS[backend])
        self.pairs = [
            ("/opt/outbox", str(venv_root)),
            ("/etc/systemd/system", str(root / "units")),
            ("/etc/outbox", str(root / "etc")),
            ("/tmp/outbox-", str(root / "outbox-")),
            ("install -d -m 0750 -o root -g outbox", "install -d -m 0750"),
            ("install -m 0600 -o root -g root", "install -m 0600"),
            ("$(openssl rand -hex 16)", PASSWORD),
            ("sudo -u postgres psql", admin),  # the admin's client on this server
            ("mariadb payments", f"{admin} payments"),
            ("--database payments", f"--database payments --prefix {names.prefix}"),
            ("@127.0.0.1/", f"@{server.host}:{server.port}/"),
            ("payments", names.database),
        ]
        self.role = rf"{names.prefix}_\1"

    def apply(self, text: str, wheel: Path, target: str) -> str:
        text = text.replace(WHEEL_IN_RUNBOOK, str(wheel))
        target_set = f"--set recrypt.target={target} --set recrypt.tls=false --set metrics.listen="
        text = text.replace("--set recrypt.target=api.recrypt.net:8443", target_set)
        for before, after in self.pairs:
            text = text.replace(before, after)
        return re.sub(r"\boutbox_(\$role|owner|daemon|writer|reader|operator)\b", self.role, text)


def bash(script: str, cwd: Path) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built once per session from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    [built] = out.glob("recrypt_outbox-*.whl")
    return built


@pytest.fixture(scope="session")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/opt/outbox of the runbook's first block, outside the checkout: the venv's root."""
    opt = tmp_path_factory.mktemp("opt") / "outbox"
    first = marked_blocks()[0][1]
    assert "-m venv /opt/outbox/.venv" in first and WHEEL_IN_RUNBOOK in first
    script = first.replace(WHEEL_IN_RUNBOOK, str(wheel)).replace("/opt/outbox", str(opt))
    version = bash(shell_steps([script]), cwd=opt.parent)
    assert version.strip().splitlines()[-1] == "outbox, version 0.1.0", version
    return opt


@pytest.fixture
def simulator(installed: Path) -> Iterator[str]:
    """The installed ``outbox simulator`` on a free loopback port: its host:port."""
    outbox = str(installed / ".venv" / "bin" / "outbox")
    proc = subprocess.Popen(
        [outbox, "simulator", "--listen", "127.0.0.1:0", "--api-key", API_KEY],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    listening = re.search(r"listening on (\S+)", line)
    assert listening, line
    yield listening.group(1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def unit_exec_start(unit: Path) -> list[str]:
    [line] = [x for x in unit.read_text().splitlines() if x.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def run_outbox(outbox: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "RECRYPT_"))}
    return subprocess.run(
        [str(outbox), *args],
        env=env | {"OUTBOX_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("backend", ROLE_BACKENDS)
def test_runbook_install_from_the_wheel(
    backend: str, wheel: Path, installed: Path, simulator: str, tmp_path: Path
) -> None:
    require_server(backend)
    tag = uuid.uuid4().hex[:8]
    names = RoleNames(database=f"outbox_test_{tag}", prefix=f"outbox_test_{tag}")
    command, env = client_command(backend)
    create = f"CREATE DATABASE {names.database}"
    subprocess.run(
        [*command, "-c" if backend == "postgresql" else "-e", create], env=env, check=True
    )
    try:
        moves = Moves(installed, tmp_path, backend, names)
        (tmp_path / "units").mkdir()
        script = moves.apply(shell_steps(blocks_for(backend)), wheel, simulator)
        out = bash(script, cwd=tmp_path)
        assert f"{names.database} is at revision" in out, out
        check_installed_daemon(installed, tmp_path, moves, backend, names)
    finally:
        _drop_database(backend, names.database)
        drop_roles(backend, names)


def role_url(backend: str, names: RoleNames, role: str) -> str:
    server = make_url(SERVER_URLS[backend])
    scheme = "postgresql" if backend == "postgresql" else "mysql"
    where = f"{server.host}:{server.port}/{names.database}"
    return f"{scheme}://{names.prefix}_{role}:{PASSWORD}@{where}"


def check_installed_daemon(
    installed: Path, root: Path, moves: Moves, backend: str, names: RoleNames
) -> None:
    """Start the unit's ExecStart as systemd would; write, send and read under the roles."""
    outbox = installed / ".venv" / "bin" / "outbox"
    config = root / "etc" / "outbox.toml"
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    assert (root / "etc" / "recrypt-api-key").stat().st_mode & 0o077 == 0
    unit = root / "units" / "outbox.service"
    assert unit_exec_start(unit) == [str(outbox), "--config", str(config), "run"]
    assert f"Documentation=file://{installed}/.venv/lib/" in unit.read_text()
    credentials = root / "credentials"  # what LoadCredential= makes
    credentials.mkdir(mode=0o700)
    (credentials / "recrypt-api-key").write_text(API_KEY + "\n")
    state = root / "state"  # WorkingDirectory= (StateDirectory=)
    state.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "RECRYPT_"))}
    log = (root / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        unit_exec_start(unit),
        cwd=state,
        env=env | {"CREDENTIALS_DIRECTORY": str(credentials)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        writer = role_url(backend, names, "writer")
        body = '{"fromAccount": "a", "toAccount": "b", "amount": "12.50"}'
        made = run_outbox(outbox, writer, "enqueue", TRANSFER, "--json", body)
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        reader = role_url(backend, names, "reader")
        committed = wait_until(lambda: row_state(reader, key) == "committed", 60)
        assert committed, (root / "daemon.log").read_text()
        for args in (["status"], ["list"], ["db", "current"], ["check"]):
            done = run_outbox(outbox, reader, *args)
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        later = run_outbox(outbox, writer, "enqueue", TRANSFER, "--json", body, *NEXT_CENTURY)
        denied = run_outbox(outbox, writer, "cancel", later.stdout.strip(), "--reason", "x")
        assert denied.returncode == 1 and denied.stderr.startswith("error: database"), denied
    finally:
        daemon.send_signal(signal.SIGTERM)
        stopped = daemon.wait(timeout=30)
        log.close()
    text = (root / "daemon.log").read_text()
    assert stopped == 0, text
    assert " error " not in text and API_KEY not in text, text


def row_state(url: str, key: str) -> str:
    engine = make_engine(url)
    try:
        return Store(engine).get(key).state
    finally:
        engine.dispose()
