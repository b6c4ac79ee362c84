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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from outbox.report import FieldPath, MethodFields
from outbox.resources import protos_dir

if TYPE_CHECKING:
    from outbox.config import Config

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

    @property
    def pool(self) -> descriptor_pool.DescriptorPool:
        return self._pool

    def report_fields(
        self, amount_fields: FieldNames = (), currency_fields: FieldNames = ()
    ) -> dict[str, MethodFields]:
        """Per submittable method, where its amount and currency sit (``outbox report``).

        Each role is found, in this order: the method's entry in a ``[report]`` table
        (``amount_fields = { "/pkg.Svc/M" = "money.amount" }``: the operator's word wins),
        the field the protos mark (``[(recrypt.options.v1.amount) = true]``, nested messages
        included), then the first name of a ``[report]`` list found in the request. A method
        without an amount is counted, not summed. A ``[report]`` name that does not exist is a
        ``ConfigError`` naming the key; two marked amounts in one request is one too.
        """
        return _report_fields(self, amount_fields, currency_fields)

    @classmethod
    def report_field_map(
        cls, config: Config, catalog: Catalog | None = None
    ) -> dict[str, MethodFields]:
        """``report_fields`` for a config: its protos (``catalog`` if already loaded) and its
        ``[report]`` section; what ``outbox report``, the console and the daemon's start read."""
        found = catalog or cls.load(config.recrypt.proto_path or None)
        return found.report_fields(config.report.amount_fields, config.report.currency_fields)

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


# ---- reconciliation: which request fields hold a method's amount and currency

AMOUNT_OPTION = "recrypt.options.v1.amount"
CURRENCY_OPTION = "recrypt.options.v1.currency"
#: A config value for ``[report] amount_fields`` / ``currency_fields``: field names tried in
#: every method's request (a list), or one field path per gRPC path (a table).
FieldNames = Mapping[str, str] | Sequence[str]
_MAX_NESTING = 8  # message levels searched for a marked field (a recursive message stops here)


class _FieldFinder:
    """One role (amount or currency): its option in the pool and its ``[report]`` value."""

    def __init__(self, catalog: Catalog, role: str, option: str, names: FieldNames) -> None:
        self.role, self.names, self.key = role, names, f"[report] {role}_fields"
        try:
            self.ext: descriptor.FieldDescriptor | None = catalog.pool.FindExtensionByName(option)
        except KeyError:
            self.ext = None

    def path(self, method: Method) -> FieldPath | None:
        """The configured path for this method, else the marked field, else a global name."""
        if isinstance(self.names, Mapping):
            named = self.names.get(method.path)
            if named is not None:
                return _resolve(method, named, f'{self.key}."{method.path}"')
        marked = self._marked(method)
        if marked is not None or isinstance(self.names, Mapping):
            return marked
        return next(filter(None, (_try_resolve(method, n) for n in self.names)), None)

    def _marked(self, method: Method) -> FieldPath | None:
        if self.ext is None:
            return None
        found = list(self._walk(method.request_class.DESCRIPTOR, ()))
        if len(found) > 1:
            names = ", ".join(p.dotted for p in found)
            raise ConfigError(
                f"the protos mark {len(found)} fields of {method.path}'s request as the "
                f"{self.role} ({names}): mark one, or name it in {self.key}"
            )
        return found[0] if found else None

    def _walk(
        self, message_type: descriptor.Descriptor, steps: tuple[tuple[str, ...], ...]
    ) -> Iterator[FieldPath]:
        if len(steps) >= _MAX_NESTING:
            return
        for f in message_type.fields:
            if _repeated(f):
                continue
            here = (*steps, _spellings(f))
            if self._is_marked(f):
                yield FieldPath(here)
            elif f.message_type is not None:
                yield from self._walk(f.message_type, here)

    def _is_marked(self, field: descriptor.FieldDescriptor) -> bool:
        if self.ext is None or not field.has_options:
            return False
        options_class = message_factory.GetMessageClass(self.ext.containing_type)
        options = options_class.FromString(field.GetOptions().SerializeToString())
        return bool(options.Extensions[self.ext])

    def check_names(self, methods: Iterable[Method]) -> None:
        """Every name of ``[report]`` exists: a table's methods and paths, a list's names in
        at least one method's request; else a ``ConfigError`` naming the key."""
        if isinstance(self.names, Mapping):
            for path, named in self.names.items():
                where = f'{self.key}."{path}"'
                found = next((m for m in methods if m.path == path), None)
                if found is None:
                    raise ConfigError(f"{where}: no submittable method {path} in the protos")
                _resolve(found, named, where)
            return
        listed = list(methods)
        for name in self.names:
            if not any(_try_resolve(m, name) for m in listed):
                raise ConfigError(
                    f"{self.key}: {name!r} is a string field of no method's request; "
                    "name fields by their proto name, nested ones with dots (money.amount)"
                )


def _spellings(field: descriptor.FieldDescriptor) -> tuple[str, ...]:
    return (field.name,) if field.json_name == field.name else (field.name, field.json_name)


def _try_resolve(method: Method, dotted: str) -> FieldPath | None:
    try:
        return _resolve(method, dotted, "")
    except ConfigError:
        return None


def _resolve(method: Method, dotted: str, key: str) -> FieldPath:
    """``money.amount`` in ``method``'s request: singular fields, the last a string."""
    message_type = method.request_class.DESCRIPTOR
    steps: list[tuple[str, ...]] = []
    field: descriptor.FieldDescriptor | None = None
    for part in dotted.split("."):
        field = message_type.fields_by_name.get(part) if message_type is not None else None
        if field is None or _repeated(field):
            raise ConfigError(
                f"{key}: {method.path}'s request has no field {dotted!r} "
                f"({message_type.full_name if message_type else 'a string'} has no {part!r})"
            )
        steps.append(_spellings(field))
        message_type = field.message_type
    if field is None or field.type != descriptor.FieldDescriptor.TYPE_STRING:
        raise ConfigError(f"{key}: {method.path}'s field {dotted!r} is not a string field")
    return FieldPath(tuple(steps))


def _report_fields(
    catalog: Catalog, amount_fields: FieldNames, currency_fields: FieldNames
) -> dict[str, MethodFields]:
    amount = _FieldFinder(catalog, "amount", AMOUNT_OPTION, amount_fields)
    currency = _FieldFinder(catalog, "currency", CURRENCY_OPTION, currency_fields)
    methods = [m for m in catalog.methods.values() if m.submittable]
    amount.check_names(methods)
    currency.check_names(methods)
    found: dict[str, MethodFields] = {}
    for method in methods:
        amount_path = amount.path(method)
        if amount_path is not None:
            found[method.path] = MethodFields(amount_path, currency.path(method))
    return found
