"""The Recrypt API surface, read from .proto files or a descriptor set at start.

Nothing here knows Recrypt's methods by name: a customer points ``[recrypt] proto_path`` at
Recrypt's real ``.proto`` directory (or a compiled ``FileDescriptorSet``) and every unary
method whose request has a ``string idempotency_key`` becomes submittable.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from google.protobuf import (
    descriptor,
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message,
    message_factory,
)

from outbox.errors import BadRowError, ConfigError
from outbox.payload import brief, check_text
from outbox.resources import protos_dir

KEY_FIELD = "idempotency_key"
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # gRPC's default maximum message size
ACCESS_OPTION = "recrypt.options.v1.key_access"
DESCRIPTOR_SET_SUFFIXES = (".pb", ".binpb", ".desc", ".protoset")


@dataclass(frozen=True)
class Method:
    """One RPC of the surface, with what the daemon needs to call it generically."""

    path: str  # "/recrypt.wallet.v1.Wallet/Transfer"
    request_class: type[message.Message]
    response_class: type[message.Message]
    server_streaming: bool
    client_streaming: bool
    key_access: str  # "read_only", "write" or "unspecified"

    @cached_property
    def two_spellings(self) -> tuple[tuple[str, str], ...]:
        """The request's fields whose JSON name differs from their name: (name, json_name)."""
        fields = self.request_class.DESCRIPTOR.fields
        return tuple((f.name, f.json_name) for f in fields if f.name != f.json_name)

    @cached_property
    def plain_fields(self) -> Mapping[str, str]:
        """The request's singular string fields outside any oneof, by both JSON spellings
        (``fromAccount`` and ``from_account``): a payload of only these, each a string, is the
        request field for field (``build_request``'s fast path; protobuf's JSON parser in
        Python costs more than the rest of a row's preparation)."""
        plain: dict[str, str] = {}
        for field in self.request_class.DESCRIPTOR.fields:
            string = field.type == descriptor.FieldDescriptor.TYPE_STRING
            alone = field.containing_oneof is None and not _repeated(field)
            if string and alone and field.name != KEY_FIELD:
                plain[field.name] = plain[field.json_name] = field.name
        return plain

    @property
    def submittable(self) -> bool:
        """Unary, with a ``string idempotency_key`` in the request: the outbox may send it."""
        if self.server_streaming or self.client_streaming:
            return False
        field = self.request_class.DESCRIPTOR.fields_by_name.get(KEY_FIELD)
        return field is not None and field.type == descriptor.FieldDescriptor.TYPE_STRING


class Catalog:
    """Every method of the loaded surface, by gRPC path."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet, source: str) -> None:
        self.source = source
        self._pool = descriptor_pool.DescriptorPool()
        for file in files.file:
            self._pool.Add(file)
        self._methods: dict[str, Method] = {}
        for file in files.file:
            for service in file.service:
                self._add_service(
                    f"{file.package}.{service.name}" if file.package else service.name
                )

    @classmethod
    def load(cls, proto_path: str | os.PathLike[str] | None = None) -> Catalog:
        """Load the bundled model (``None``), a directory of .proto files, or a descriptor set."""
        path = Path(proto_path) if proto_path else protos_dir()
        if not path.exists():
            raise ConfigError(
                f"[recrypt] proto_path: {path} does not exist; point it at the directory of "
                "Recrypt's .proto files or at a compiled descriptor set"
            )
        if path.is_file():
            return cls(_read_descriptor_set(path), str(path))
        return cls(_compile(path), str(path))

    def method(self, path: str) -> Method:
        found = self._methods.get(path)
        if found is None:
            raise BadRowError(
                f"unknown method {brief(repr(path))}: no such RPC in the protos at {self.source}; "
                "use the full gRPC path, e.g. /recrypt.wallet.v1.Wallet/Transfer",
                reason="bad_row",
            )
        return found

    def submittable(self, path: str) -> Method:
        found = self.method(path)
        if not found.submittable:
            raise BadRowError(
                f"method {path!r} cannot be sent from the outbox: only unary methods whose "
                f"request has a string {KEY_FIELD} field are idempotent",
                reason="bad_row",
            )
        return found

    @property
    def methods(self) -> Mapping[str, Method]:
        return self._methods

    @cached_property
    def _access_extension(self) -> descriptor.FieldDescriptor | None:
        try:
            return self._pool.FindExtensionByName(ACCESS_OPTION)
        except KeyError:
            return None

    def _add_service(self, full_name: str) -> None:
        service = self._pool.FindServiceByName(full_name)
        for m in service.methods:
            path = f"/{full_name}/{m.name}"
            self._methods[path] = Method(
                path=path,
                request_class=message_factory.GetMessageClass(m.input_type),
                response_class=message_factory.GetMessageClass(m.output_type),
                server_streaming=bool(m.server_streaming),
                client_streaming=bool(m.client_streaming),
                key_access=self._key_access(m),
            )

    def _key_access(self, method: descriptor.MethodDescriptor) -> str:
        """Read the custom method option; it lives in our pool, not the default one."""
        ext = self._access_extension
        if ext is None or not method.has_options:
            return "unspecified"
        options_class = message_factory.GetMessageClass(ext.containing_type)
        options = options_class.FromString(method.GetOptions().SerializeToString())
        number = options.Extensions[ext]
        name = ext.enum_type.values_by_number[number].name if ext.enum_type else str(number)
        if "READ" in name:
            return "read_only"
        if "WRITE" in name:
            return "write"
        return "unspecified"


def _repeated(field: descriptor.FieldDescriptor) -> bool:
    """protobuf 5.29+ says ``is_repeated`` (and 7 dropped ``label``); earlier ones, ``label``."""
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == descriptor.FieldDescriptor.LABEL_REPEATED)


def build_request(method: Method, payload: Any, key: str) -> message.Message:
    """The request from the row's JSON, with ``idempotency_key`` set to the row's key.

    Raises ``BadRowError`` saying exactly which part of the payload is wrong, quoting at most
    a short prefix of each piece of it (a field name can be 70 kB).
    """
    if not isinstance(payload, dict):
        raise BadRowError(
            f"payload must be a JSON object (the request in protobuf JSON mapping), "
            f"got {type(payload).__name__}"
        )
    body = dict(payload)
    for name in (KEY_FIELD, "idempotencyKey"):
        if name in body and body.pop(name) != key:
            raise BadRowError(
                f"payload field {name} differs from the row's idempotency_key; "
                "leave it out of the payload (the daemon sets it)"
            )
    for name, json_name in method.two_spellings:
        if name in body and json_name in body:
            raise BadRowError(f"payload has both {name} and {json_name}: write the field once")
    request = _plain_request(method, body)
    if request is None:
        check_text(body)
        request = _parsed_request(method, body)
    setattr(request, KEY_FIELD, key)
    if request.ByteSize() > MAX_REQUEST_BYTES:
        raise BadRowError(
            f"request is {request.ByteSize()} bytes, over gRPC's {MAX_REQUEST_BYTES}-byte "
            "message limit: it can never be sent"
        )
    return request


def _plain_request(method: Method, body: dict[str, Any]) -> message.Message | None:
    """The request when every field of ``body`` is a plain string field holding a string
    (what protobuf's JSON parser would build from it); None when any is not."""
    plain = method.plain_fields
    if not all(type(value) is str and name in plain for name, value in body.items()):
        return None
    try:  # a lone surrogate (field names here are the protos' own): check_text says so
        "".join(body.values()).encode("utf-8")
    except UnicodeEncodeError:
        check_text(body)
    return method.request_class(**{plain[name]: value for name, value in body.items()})


def _parsed_request(method: Method, body: dict[str, Any]) -> message.Message:
    """The request from ``body`` by protobuf's JSON mapping, its errors a ``BadRowError``."""
    request = method.request_class()
    try:
        json_format.ParseDict(body, request)
    except RecursionError:
        raise BadRowError("payload JSON is nested too deeply to be a request") from None
    except json_format.ParseError as exc:
        raise BadRowError(
            f"payload does not parse as {method.request_class.DESCRIPTOR.full_name}: "
            + brief(str(exc))
        ) from exc
    return request


def response_to_json(response: message.Message) -> dict[str, Any]:
    """``json_format.MessageToDict``; for a response of only singular string fields, the same
    dict read directly (the JSON printer costs more than the rest of a row's decision)."""
    names = _string_fields(response.DESCRIPTOR)
    if names is not None:
        return {names[field.name]: value for field, value in response.ListFields()}
    converted: dict[str, Any] = json_format.MessageToDict(response)
    return converted


@functools.cache
def _string_fields(message_type: descriptor.Descriptor) -> Mapping[str, str] | None:
    """Field name → JSON name when every field of ``message_type`` is a singular string and
    it takes no extensions (``MessageToDict`` would print those under ``[full.name]``)."""
    fields = message_type.fields
    string = descriptor.FieldDescriptor.TYPE_STRING
    if message_type.is_extendable or any(f.type != string or _repeated(f) for f in fields):
        return None
    return {f.name: f.json_name for f in fields}


def _include_dir() -> str:
    import grpc_tools  # noqa: PLC0415 - only needed when compiling

    return str(Path(grpc_tools.__file__).parent / "_proto")


def _compile(root: Path) -> descriptor_pb2.FileDescriptorSet:
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))
    if not files:
        raise ConfigError(
            f"[recrypt] proto_path: no .proto files under {root}; point it at the directory "
            "holding Recrypt's .proto files"
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        argv = [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"-I{_include_dir()}"]
        argv += ["--include_imports", f"--descriptor_set_out={out}", *files]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ConfigError(
                f"[recrypt] proto_path: the .proto files under {root} do not compile:\n"
                f"{done.stderr.strip()}"
            )
        return _read_descriptor_set(out)


def _read_descriptor_set(path: Path) -> descriptor_pb2.FileDescriptorSet:
    if path.suffix not in DESCRIPTOR_SET_SUFFIXES:
        raise ConfigError(
            f"[recrypt] proto_path: {path} is a file but not a descriptor set "
            f"({', '.join(DESCRIPTOR_SET_SUFFIXES)}); build one with "
            "`protoc --include_imports --descriptor_set_out=recrypt.pb ...`"
        )
    try:
        return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    except Exception as exc:
        raise ConfigError(
            f"[recrypt] proto_path: {path} is not a FileDescriptorSet: {exc}"
        ) from exc
