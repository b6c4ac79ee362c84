from __future__ import annotations

import os
from pathlib import Path

import pytest

from outbox.config import load
from outbox.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "outbox.toml"
    path.write_text(text)
    return path


def test_defaults_are_safe() -> None:
    config = load(None, env={})
    assert config.recrypt.tls is True
    assert config.recrypt.target == "api.recrypt.net:8443"
    assert config.retry.max_backoff == 180.0
    assert config.api_key is None


def test_example_config_loads_and_matches_defaults() -> None:
    assert load(ROOT / "config.example.toml", env={}) == load(None, env={})


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[worker]\nbatch_size = 0\n", "[worker] batch_size"),
        ("[worker]\nbatchsize = 10\n", "[worker] batchsize: unknown key"),
        ("[recrypt]\ntarget = 'nohost'\n", "[recrypt] target"),
        ("[retry]\njitter = 2\n", "[retry] jitter"),
        ("[maintenance]\nrollover_window = 'Tuesday 6pm'\n", "[maintenance] rollover_window"),
        ("[recrypt]\ndeadline = 'ten'\n", "[recrypt] deadline"),
        ("[databse]\nurl = 'x'\n", "databse: unknown key"),
        ("[worker]\nlease = 5\n", "[worker] lease (5 s) must be longer than [recrypt] deadline"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, named) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env={})
    assert named in str(info.value)


def test_invalid_toml_and_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[worker\n"), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", env={})


def test_env_overrides(tmp_path) -> None:
    path = write(tmp_path, "[database]\nurl = 'sqlite:///a.db'\n")
    config = load(path, env={"OUTBOX_DATABASE_URL": "sqlite:///b.db", "RECRYPT_API_KEY": "k1"})
    assert config.database.url == "sqlite:///b.db"
    assert config.require_api_key().get_secret_value() == "k1"


def test_key_from_file_and_from_systemd_credentials(tmp_path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    os.chmod(key_file, 0o600)
    path = write(tmp_path, f"[recrypt]\napi_key_file = '{key_file}'\n")
    assert load(path, env={}).require_api_key().get_secret_value() == "from-file"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "recrypt-api-key").write_text("from-systemd")
    config = load(None, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.require_api_key().get_secret_value() == "from-systemd"


def test_missing_key_says_where_to_put_it() -> None:
    with pytest.raises(ConfigError, match="RECRYPT_API_KEY"):
        load(None, env={}).require_api_key()


def test_api_key_never_in_repr_or_errors(tmp_path) -> None:
    config = load(None, env={"RECRYPT_API_KEY": "sekret-123"})
    assert "sekret-123" not in repr(config)
    assert "sekret-123" not in str(config.model_dump())


def test_a_key_file_readable_by_others_is_refused_or_warned(tmp_path, caplog) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("secret-key\n")
    os.chmod(key_file, 0o644)
    path = write(tmp_path, f"[recrypt]\napi_key_file = '{key_file}'\n")
    with pytest.raises(ConfigError, match="chmod 600") as info:
        load(path, env={})
    assert "secret-key" not in str(info.value)
    lenient = write(
        tmp_path, f"[recrypt]\napi_key_file = '{key_file}'\nkey_file_permissions = 'warn'\n"
    )
    assert load(lenient, env={}).require_api_key().get_secret_value() == "secret-key"
    assert "readable by group or others" in caplog.text


@pytest.mark.parametrize("key", ["ké€y-1234", "key\u201c1234\u201d", "key\u20131234"])
def test_a_key_gRPC_cannot_send_is_refused_at_start(key) -> None:
    """gRPC refuses non-ASCII metadata locally (INTERNAL "Invalid metadata"): before this
    check, every row was parked as an unknown outcome though nothing was ever sent."""
    with pytest.raises(ConfigError, match="not ASCII") as refused:
        load(None, env={"RECRYPT_API_KEY": key})
    assert key not in str(refused.value)
