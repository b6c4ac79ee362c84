"""The systemd units in packaging/systemd: required keys always, systemd-analyze when present."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "packaging" / "systemd"
SERVICE = UNITS / "outbox.service"
CHECK = UNITS / "outbox-check.service"
TIMER = UNITS / "outbox-check.timer"
CONSOLE = UNITS / "outbox-console.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)


def parse(path: Path) -> configparser.ConfigParser:
    """A unit file as INI: strict=False because systemd allows repeated keys (last wins here,
    good enough for keys set once); no interpolation because of %n and $MAINPID."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(path, encoding="utf-8")
    return parser


def test_service_has_the_required_keys() -> None:
    service = parse(SERVICE)["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"].endswith("/outbox --config /etc/outbox/outbox.toml run")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["WatchdogSec"] == "30"
    assert service["Restart"] == "on-failure"
    assert service["TimeoutStopSec"] == "60"
    assert service["LoadCredential"].startswith("recrypt-api-key:")
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert "User" in service or service.get("DynamicUser") == "yes"
    assert service["StateDirectory"] == "outbox"
    assert service["WorkingDirectory"] == "/var/lib/outbox"
    assert service["CapabilityBoundingSet"] == ""
    assert service["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]


def test_database_url_is_not_forced_by_the_unit() -> None:
    """OUTBOX_DATABASE_URL overrides [database] url: the unit must not set it for everyone."""
    assert "OUTBOX_DATABASE_URL" not in parse(SERVICE)["Service"].get("Environment", "")


def test_check_service_and_timer() -> None:
    check = parse(CHECK)["Service"]
    assert check["Type"] == "oneshot"
    assert check["ExecStart"].endswith(" check")
    assert "LoadCredential" not in check  # check reads the database only: no API key
    timer = parse(TIMER)
    assert timer["Timer"]["OnUnitActiveSec"] == "5min"
    assert timer["Timer"]["Unit"] == "outbox-check.service"
    assert timer["Install"]["WantedBy"] == "timers.target"


#: The daemon's keys the console's unit must hold with the same value (its hardening).
HARDENING = [
    "NoNewPrivileges",
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectClock",
    "ProtectHostname",
    "RestrictAddressFamilies",
    "RestrictNamespaces",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "LockPersonality",
    "RemoveIPC",
    "MemoryDenyWriteExecute",
    "SystemCallArchitectures",
    "SystemCallFilter",
    "SystemCallErrorNumber",
    "CapabilityBoundingSet",
    "AmbientCapabilities",
    "User",
    "Group",
]


def test_console_service_is_hardened_like_the_daemon() -> None:
    daemon, console = parse(SERVICE)["Service"], parse(CONSOLE)["Service"]
    assert {key: console.get(key) for key in HARDENING} == {key: daemon[key] for key in HARDENING}
    assert console["ExecStart"].endswith("/outbox --config /etc/outbox/outbox.toml console")
    assert "LoadCredential" not in console  # the console never reads the API key
    assert parse(CONSOLE)["Install"]["WantedBy"] == "multi-user.target"


def verifiable_copies(tmp_path: Path) -> list[Path]:
    """Copies whose ExecStart is /bin/true: verify checks that the binary exists and is
    executable, and /opt/outbox/.venv/bin/outbox is not installed on a build machine. The
    unit names stay the same so the timer still finds its service."""
    copies = []
    for unit in (SERVICE, CHECK, TIMER, CONSOLE):
        text = re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", unit.read_text("utf-8"))
        copy = tmp_path / unit.name
        copy.write_text(text, "utf-8")
        copies.append(copy)
    return copies


@pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt install systemd)"
)
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify exits 0 even for unknown keys or bad values (it only prints them): so the test
    also requires that it says nothing about our units."""
    copies = verifiable_copies(tmp_path)
    result = subprocess.run(
        [str(ANALYZE), "verify", *map(str, copies)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    complaints = [line for line in output.splitlines() if "outbox" in line]
    assert result.returncode == 0, output
    assert complaints == []


@pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt install systemd)"
)
def test_systemd_analyze_security_exposure_stays_low(tmp_path: Path) -> None:
    """A regression guard on the hardening: systemd rates exposure 0 (best) to 10."""
    service = verifiable_copies(tmp_path)[0]
    result = subprocess.run(
        [str(ANALYZE), "security", "--offline=true", "--no-pager", str(service)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for outbox\.service: ([\d.]+)", result.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline unsupported here: {result.stderr[:200]}")
    assert float(match.group(1)) <= 3.0, result.stdout
