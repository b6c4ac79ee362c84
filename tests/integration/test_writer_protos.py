"""``outbox.enqueue`` validates against the protos the daemon uses (issue 12): ``proto_path``
as an argument, else ``[recrypt] proto_path`` of the config in ``OUTBOX_CONFIG``, else the
bundled model. Keys may be ``uuid.UUID``. Real databases."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

import outbox
from outbox.errors import BadRowError, ConfigError
from outbox.store import Store
from tests.integration.test_descriptors import ACME, SEND

TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"
PAYMENT = {"beneficiary": "b-1", "amount": "10.00"}


@pytest.fixture
def acme(tmp_path: Path) -> Path:
    root = tmp_path / "protos"
    (root / "acme" / "payments" / "v2").mkdir(parents=True)
    (root / "acme" / "payments" / "v2" / "payments.proto").write_text(ACME)
    return root


def config_naming(tmp_path: Path, protos: Path) -> Path:
    path = tmp_path / "outbox.toml"
    path.write_text(f'[recrypt]\nproto_path = "{protos}"\napi_key_file = "/nowhere/key"\n')
    return path


def test_enqueue_takes_the_daemons_proto_path_as_an_argument(engine: Engine, acme: Path) -> None:
    with engine.begin() as conn:
        key = outbox.enqueue(conn, SEND, PAYMENT, proto_path=acme)
    assert Store(engine).get(key).method == SEND


def test_enqueue_reads_proto_path_from_the_config_in_outbox_config(
    engine: Engine, acme: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOX_CONFIG", str(config_naming(tmp_path, acme)))
    with engine.begin() as conn:
        key = outbox.enqueue(conn, SEND, PAYMENT)
        with pytest.raises(BadRowError, match="unknown method"):  # not in the daemon's protos
            outbox.enqueue(conn, TRANSFER, {"fromAccount": "a", "toAccount": "b", "amount": "1"})
    assert Store(engine).get(key).method == SEND


def test_without_either_the_bundled_model_is_used(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OUTBOX_CONFIG", raising=False)
    with engine.begin() as conn, pytest.raises(BadRowError, match="unknown method"):
        outbox.enqueue(conn, SEND, PAYMENT)


def test_a_missing_proto_path_names_the_key(engine: Engine, tmp_path: Path) -> None:
    with engine.begin() as conn, pytest.raises(ConfigError, match="proto_path"):
        outbox.enqueue(conn, SEND, PAYMENT, proto_path=tmp_path / "absent")


def test_a_uuid_key_is_accepted_and_stored_as_its_lowercase_text(engine: Engine) -> None:
    key = uuid.uuid4()
    body = {"fromAccount": "a", "toAccount": "b", "amount": "1.00"}
    with engine.begin() as conn:
        made = outbox.enqueue(conn, TRANSFER, body, key=key)
    assert made == str(key)
    assert Store(engine).get(str(key)).idempotency_key == str(key)
