"""When tracing is on, and what the SDK is built with (``outbox.tracing``): the standard
``OTEL_*`` variables decide, and installing the extra alone turns nothing on."""

from __future__ import annotations

import pytest

from outbox import tracing

ENDPOINT = "http://127.0.0.1:4317"

#: (environment, on?)
WHEN = [
    ({}, False),  # the extra installed, nothing asked: off
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_TRACES_EXPORTER": " None "}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, False),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "TRUE"}, False),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "false"}, True),
]


@pytest.mark.parametrize(("env", "on"), WHEN, ids=[str(e) for e, _on in WHEN])
def test_tracing_is_on_only_when_the_environment_asks(env: dict[str, str], on: bool) -> None:
    assert tracing.configured(env) is on
    made = tracing.from_env(env)
    assert made.on is on
    made.close()


def test_otlp_means_the_exporter_of_the_configured_protocol() -> None:
    assert tracing.exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}) == ["otlp_proto_grpc"]
    http = {"OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert tracing.exporter_names(http) == ["otlp_proto_http", "console"]
    traces_first = http | {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}
    assert tracing.exporter_names(traces_first)[0] == "otlp_proto_grpc"


def test_an_unknown_exporter_is_left_out_and_said(caplog: pytest.LogCaptureFixture) -> None:
    made = tracing.from_env({"OTEL_TRACES_EXPORTER": "zipkin-that-is-not-installed"})
    assert not made.on
    assert "event=tracing_exporter_unknown exporter=zipkin-that-is-not-installed" in caplog.text


def test_the_service_is_named_recrypt_outbox_unless_otel_service_name_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"OTEL_TRACES_EXPORTER": "console"}
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    provider = tracing.provider_from_env(env)
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "recrypt-outbox"
    assert provider.resource.attributes["service.version"] == "0.1.0"
    provider.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "payments-outbox")
    provider = tracing.provider_from_env(env)
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "payments-outbox"
    provider.shutdown()


@pytest.mark.parametrize(
    ("target", "attributes"),
    [
        ("api.recrypt.net:443", {"server.address": "api.recrypt.net", "server.port": 443}),
        ("[::1]:50051", {"server.address": "::1", "server.port": 50051}),
        ("recrypt", {"server.address": "recrypt"}),
    ],
)
def test_the_target_gives_server_address_and_port(target: str, attributes: dict) -> None:
    assert tracing.server_attributes(target) == attributes
