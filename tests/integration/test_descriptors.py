"""The daemon is descriptor-driven: another proto package works with no code change."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

import outbox
from outbox.backoff import Backoff
from outbox.client import GrpcClient
from outbox.config import RecryptConfig
from outbox.descriptors import Catalog
from outbox.dispatcher import Dispatcher, DispatchSettings
from outbox.errors import BadRowError, ConfigError
from outbox.gates import Gates
from outbox.simulator import Simulator

ACME = """
syntax = "proto3";
package acme.payments.v2;

service Payments {
  rpc Send(SendRequest) returns (SendReply);
  rpc Lookup(LookupRequest) returns (SendReply);
}
message SendRequest {
  string idempotency_key = 7;
  string beneficiary = 1;
  string amount = 2;
}
message SendReply { string payment_id = 1; }
message LookupRequest { string payment_id = 1; }
"""
SEND = "/acme.payments.v2.Payments/Send"


@pytest.fixture(scope="module")
def acme_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("acme_protos")
    (root / "acme" / "payments" / "v2").mkdir(parents=True)
    (root / "acme" / "payments" / "v2" / "payments.proto").write_text(ACME)
    return root


@pytest.fixture(scope="module")
def acme_descriptor_set(acme_dir: Path) -> Path:
    out = acme_dir.parent / "acme.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{acme_dir}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            "acme/payments/v2/payments.proto",
        ],
        check=True,
    )
    return out


@pytest.mark.parametrize("source", ["directory", "descriptor_set"])
def test_another_package_is_sent_end_to_end(source, acme_dir, acme_descriptor_set, engine, store):
    catalog = Catalog.load(acme_dir if source == "directory" else acme_descriptor_set)
    assert catalog.submittable(SEND).path == SEND
    with pytest.raises(BadRowError, match="cannot be sent"):
        catalog.submittable("/acme.payments.v2.Payments/Lookup")  # no idempotency_key
    with engine.begin() as conn:
        key = outbox.enqueue(conn, SEND, {"beneficiary": "bob", "amount": "3.50"}, catalog=catalog)
    with Simulator(catalog, api_keys=["k"]) as sim:
        client = GrpcClient(RecryptConfig(target=sim.target, tls=False), "k")
        gates = Gates(Backoff(), 8, rng=random.Random(0))
        dispatcher = Dispatcher(
            store, client, catalog, gates, worker_id="w", settings=DispatchSettings(batch_size=8)
        )
        dispatcher.run_once()
        client.close()
        assert store.get(key).state == "committed"
        assert sim.ledger[0].method == SEND
        assert sim.ledger[0].request == {
            "idempotency_key": key,
            "beneficiary": "bob",
            "amount": "3.50",
        }


def test_bundled_model_has_the_spec_surface() -> None:
    catalog = Catalog.load()
    writes = {p for p, m in catalog.methods.items() if m.submittable}
    assert writes == {
        "/recrypt.wallet.v1.Wallet/Transfer",
        "/recrypt.market.v1.Market/PlaceOrder",
        "/recrypt.market.v1.Market/CancelOrder",
    }
    assert catalog.method("/recrypt.core.v1.Core/MaintenanceCheck").key_access == "read_only"
    assert catalog.method("/recrypt.wallet.v1.Wallet/Transfer").key_access == "write"
    stream = catalog.method("/recrypt.market.v1.Market/StreamOrderUpdates")
    assert stream.server_streaming and not stream.submittable


def test_broken_protos_fail_at_start_with_protoc_message(tmp_path) -> None:
    (tmp_path / "bad.proto").write_text('syntax = "proto3"; message X { strin y = 1; }')
    with pytest.raises(ConfigError, match="do not compile"):
        Catalog.load(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        Catalog.load(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ConfigError, match="not a descriptor set"):
        Catalog.load(tmp_path / "x.txt")
