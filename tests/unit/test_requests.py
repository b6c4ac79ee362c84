"""A request from a payload: the plain-string fast path builds what protobuf's JSON parser
builds, and every other payload still goes through the parser (its errors unchanged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from outbox.descriptors import Catalog, build_request
from outbox.errors import BadRowError

KEY = "00000000-0000-4000-8000-000000000001"
PROTO = """
syntax = "proto3";
package t.v1;
service S { rpc M(R) returns (R); }
message Inner { string s = 1; }
message R {
  string idempotency_key = 1;
  string from_account = 2;
  repeated string tags = 3;
  oneof target { string iban = 4; string wallet = 5; }
  optional string memo = 6;
  int64 cents = 7;
  Inner inner = 8;
}
"""


@pytest.fixture(scope="module")
def method(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("protos")
    (root / "t.proto").write_text(PROTO)
    out = root / "t.pb"
    argv = [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", "--include_imports"]
    subprocess.run([*argv, f"--descriptor_set_out={out}", "t.proto"], check=True)
    return Catalog.load(Path(out)).submittable("/t.v1.S/M")


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"fromAccount": "a"},
        {"from_account": "ünïcødé 💸"},
        {"fromAccount": "a", "iban": "DE00"},  # a oneof member
        {"memo": "m"},  # proto3 optional (a synthetic oneof)
        {"tags": ["x", "y"]},
        {"cents": "1050"},
        {"inner": {"s": "x"}},
        {"fromAccount": None},
    ],
)
def test_a_request_is_what_the_json_parser_builds(method: Any, payload: dict[str, Any]) -> None:
    expected = json_format.ParseDict(payload, method.request_class())
    expected.idempotency_key = KEY
    assert build_request(method, payload, KEY) == expected


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ({"fromAccount": 7}, "parse"),
        ({"tags": "x"}, "parse"),
        ({"iban": "a", "wallet": "b"}, "parse"),
        ({"nope": "x"}, "parse"),
        ({"from_account": "a", "fromAccount": "a"}, "both from_account and fromAccount"),
    ],
)
def test_any_other_payload_is_refused_as_before(method: Any, payload: Any, says: str) -> None:
    with pytest.raises(BadRowError, match=says):
        build_request(method, payload, KEY)
