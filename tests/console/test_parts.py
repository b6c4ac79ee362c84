"""The console's pure parts and its commands: runbook words, redaction, throttle, users."""

from __future__ import annotations

import json
import re
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from outbox.cli import main
from outbox.config import ConfigError, load
from outbox.console import commands
from outbox.console.redact import MASK, pretty
from outbox.console.runbook import ADVICE, advice_for
from outbox.console.security import LoginThrottle
from outbox.console.settings import session_secret
from outbox.console.users import Role, read_users, verify
from outbox.vocabulary import ParkReason

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_every_park_reason_has_the_runbooks_heading() -> None:
    text = RUNBOOK.read_text("utf-8")
    section = text[text.index("## 6. Parked rows") : text.index("## 7. Gates")]
    headings = dict(re.findall(r"^### `([a-z_]+)`: (.+)$", section, re.MULTILINE))
    assert set(ADVICE) == set(ParkReason) == set(headings)
    for reason, advice in ADVICE.items():
        assert advice.heading == headings[reason.value], reason
        assert advice.steps


def test_advice_for_a_state_and_an_unknown_reason() -> None:
    assert advice_for("parked", "precondition")[0].startswith("precondition: FAILED_PRECONDITION")
    assert "§6" in advice_for("parked", "something_new")[1][0]
    assert "in flight" in advice_for("inflight", None)[1][0]


def test_redaction_masks_named_fields_at_any_depth_in_either_spelling() -> None:
    stored = json.dumps({"fromAccount": "acme", "legs": [{"to_account": "x", "amount": "1"}]})
    shown = pretty(stored, ("from_account", "to_account"))
    assert "acme" not in shown and '"x"' not in shown and shown.count(MASK) == 2
    assert '"amount": "1"' in shown
    assert pretty("not json {", ("a",)) == "not json {"
    assert pretty(None, ()) == ""


def test_the_throttle_holds_one_user_for_its_window() -> None:
    throttle = LoginThrottle(limit=3, window=60)
    for second in range(3):
        throttle.failed("otto", now=float(second))
    assert throttle.blocked_for("otto", now=10.0) == pytest.approx(50.0)
    assert throttle.blocked_for("olga", now=10.0) == 0
    assert throttle.blocked_for("otto", now=61.0) == 0


def test_the_session_secret_is_made_once_private(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    first = session_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and session_secret(path) == first
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        session_secret(path)


def test_config_section_defaults_and_errors(tmp_path: Path) -> None:
    console = load(None, env={}, with_key=False).console
    assert console.listen == "127.0.0.1:8765" and not console.dual_control
    assert console.redact_fields == ("from_account", "to_account", "account")
    bad = tmp_path / "bad.toml"
    bad.write_text('[console]\nlisten = "8765"\ntrusted_proxy_header = "X User"\n')
    with pytest.raises(ConfigError) as caught:
        load(bad, env={}, with_key=False)
    assert "[console] listen: " in str(caught.value) and "host:port" in str(caught.value)
    assert "[console] trusted_proxy_header: " in str(caught.value)


def _cli(config: Path, *args: str, stdin: str = "") -> tuple[int, str]:
    result = CliRunner().invoke(
        main, ["--config", str(config), "console", *args], input=stdin, env={"OUTBOX_CONFIG": None}
    )
    return result.exit_code, result.output


def test_user_add_list_remove(tmp_path: Path) -> None:
    config = tmp_path / "outbox.toml"
    config.write_text("")
    password = "a long enough password"
    code, out = _cli(config, "user", "add", "olga", "--role", "operator", stdin=password + "\n")
    assert code == 0, out
    users_file = tmp_path / "console-users.json"
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert password not in users_file.read_text()
    olga = read_users(users_file)["olga"]
    assert olga.role == Role.OPERATOR and olga.hash.startswith("$argon2id$")
    assert verify(olga, password) and not verify(olga, "wrong") and not verify(None, password)
    assert _cli(config, "user", "add", "vera", "--role", "viewer", stdin="short\n")[0] == 1
    code, out = _cli(config, "user", "list")
    assert out.split() == ["olga", "operator", "password"]
    assert _cli(config, "user", "remove", "olga")[0] == 0
    code, out = _cli(config, "user", "remove", "olga")
    assert code == 1 and "no console user olga" in out


def test_without_the_extra_the_console_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # an import of it now fails
    config = tmp_path / "outbox.toml"
    config.write_text("")
    code, out = _cli(config)
    assert code == 1
    assert out.strip().splitlines() == [
        "error: the console needs the 'console' extra (uvicorn is not installed): "
        f"{commands.EXTRA_HINT}"
    ]
