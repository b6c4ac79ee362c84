"""A request from a payload: the plain-string fast path builds what protobuf's JSON parser
builds, and every other payload still goes through the parser (its errors unchanged). A
response to JSON: the all-strings fast path prints what protobuf's JSON printer prints."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from outbox.descriptors import Catalog, build_request, response_to_json
from outbox.errors import BadRowError

KEY = "00000000-0000-4000-8000-000000000001"
PROTO = """
syntax = "proto3";
package t.v1;
service S { rpc M(R) returns (R); rpc N(R) returns (Out); }
message Inner { string s = 1; }
message Out {
  string transfer_id = 1;
  optional string memo = 2;
  oneof where { string iban = 3; string wallet = 4; }
}
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
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    root = tmp_path_factory.mktemp("protos")
    (root / "t.proto").write_text(PROTO)
    out = root / "t.pb"
    argv = [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", "--include_imports"]
    subprocess.run([*argv, f"--descriptor_set_out={out}", "t.proto"], check=True)
    return Catalog.load(Path(out))


@pytest.fixture(scope="module")
def method(catalog: Catalog) -> Any:
    return catalog.submittable("/t.v1.S/M")


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


def test_a_plain_payload_with_a_lone_surrogate_is_refused_as_before(method: Any) -> None:
    with pytest.raises(BadRowError, match="lone UTF-16 surrogate"):
        build_request(method, {"fromAccount": "cut inside an emoji \ud83d"}, KEY)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"transfer_id": "tr_1"},
        {"transfer_id": "ünïcødé 💸", "memo": ""},  # optional: set to "" is printed
        {"memo": "m", "wallet": "w"},
        {"iban": ""},  # a oneof member set to its default is printed too
    ],
)
def test_a_string_response_is_what_the_json_printer_prints(
    catalog: Catalog, fields: dict[str, str]
) -> None:
    response = catalog.method("/t.v1.S/N").response_class(**fields)
    assert response_to_json(response) == json_format.MessageToDict(response)
    assert list(response_to_json(response)) == list(json_format.MessageToDict(response))


def test_any_other_response_goes_through_the_json_printer(catalog: Catalog) -> None:
    response = catalog.method("/t.v1.S/M").response_class(
        from_account="a", tags=["x"], cents=7, inner={"s": "x"}
    )
    assert response_to_json(response) == json_format.MessageToDict(response)


def test_every_bundled_response_prints_as_the_json_printer_prints() -> None:
    for method in Catalog.load().methods.values():
        response = method.response_class()
        for field in response.DESCRIPTOR.fields:
            if field.type == field.TYPE_STRING and field.containing_oneof is None:
                with contextlib.suppress(AttributeError, TypeError):  # repeated: not settable
                    setattr(response, field.name, f"v-{field.name}")
        assert response_to_json(response) == json_format.MessageToDict(response), method.path
