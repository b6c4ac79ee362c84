"""The business logic of the model methods: transfers, balances, orders, the maintenance check.

Each logic function takes a request message and returns the response, or raises ``Status``
for a business refusal; the server calls them with its lock held and publishes order updates
through the callback it gives. It must not import ``outbox.simulator.server`` or ``.cli``.
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from outbox.descriptors import KEY_FIELD, Catalog
from outbox.vocabulary import RecryptMethod

# The methods the daemon knows by name come from the vocabulary; the rest are the model's own.
MAINTENANCE_CHECK: str = RecryptMethod.MAINTENANCE_CHECK.value
TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"
GET_BALANCES = "/recrypt.wallet.v1.Wallet/GetBalances"
PLACE_ORDER: str = RecryptMethod.PLACE_ORDER.value
CANCEL_ORDER: str = RecryptMethod.CANCEL_ORDER.value
STREAM_ORDER_UPDATES: str = RecryptMethod.STREAM_ORDER_UPDATES.value

# Fields the business logic reads (request) and writes (response) per model method. A proto
# tree that serves the same path with other fields gets the generic behaviour instead.
_MODEL_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    MAINTENANCE_CHECK: (
        set(),
        {"maintenance_mode", "rollover_scheduled", "rollover_start", "rollover_end", "notice"},
    ),
    TRANSFER: (
        {"from_account", "to_account", "amount", "currency"},
        {"transfer_id", "executed_at"},
    ),
    GET_BALANCES: ({"account"}, {"balances"}),
    PLACE_ORDER: ({"account", "market", "type", "quantity", "limit_price"}, {"order_id", "status"}),
    CANCEL_ORDER: ({"account", "order_id"}, {"order_id", "status"}),
    STREAM_ORDER_UPDATES: (
        {"account"},
        {"order_id", "status", "filled_quantity", KEY_FIELD, "at"},
    ),
}

_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")

Logic = Callable[[Message], Message]
#: Hands an OrderUpdate to the account's open streams (called with the server's lock held).
Publish = Callable[[str, Message], None]


class Status(Exception):
    """A non-OK answer decided while serving a call."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Order:
    account: str
    key: str
    quantity: str
    status: str  # OrderStatus value name, e.g. "ORDER_STATUS_OPEN"


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def to_dict(msg: Message) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return result


def positive_decimal(text: str, name: str) -> Decimal:
    if not _DECIMAL.fullmatch(text) or Decimal(text) <= 0:
        raise Status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{name} must be a positive decimal string such as '10.00', got {text!r}",
        )
    return Decimal(text)


def _required(value: str, name: str) -> str:
    if not value:
        raise Status(grpc.StatusCode.INVALID_ARGUMENT, f"{name} required")
    return value


def _enum_number(msg: Message | type[Message], field_name: str, value: str) -> int:
    enum_type = msg.DESCRIPTOR.fields_by_name[field_name].enum_type
    number: int = enum_type.values_by_name[value].number
    return number


def _has_fields(msg_class: type[Message], names: set[str]) -> bool:
    return names <= set(msg_class.DESCRIPTOR.fields_by_name)


class Model:
    """The state behind the model methods: balances, orders, maintenance and rollover."""

    def __init__(
        self,
        catalog: Catalog,
        transfer_limit: Decimal,
        clock: Callable[[], datetime],
        publish: Publish,
    ) -> None:
        self.catalog = catalog
        self.transfer_limit = transfer_limit
        self.maintenance: str | None = None
        self.rollover: tuple[datetime | None, datetime | None] = (None, None)
        self.notice = ""
        self.balances: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        self._orders: dict[str, _Order] = {}
        self._clock = clock
        self._publish = publish
        self.logic = self._model_logic()

    def _model_logic(self) -> dict[str, Logic]:
        logic: dict[str, Logic] = {
            MAINTENANCE_CHECK: self._maintenance_check,
            TRANSFER: self._transfer,
            GET_BALANCES: self._get_balances,
            PLACE_ORDER: self._place_order,
            CANCEL_ORDER: self._cancel_order,
            STREAM_ORDER_UPDATES: lambda request: request,  # served by the server's streams
        }
        return {path: fn for path, fn in logic.items() if self._fits_model(path)}

    def _fits_model(self, path: str) -> bool:
        method = self.catalog.methods.get(path)
        if method is None:
            return False
        request_fields, response_fields = _MODEL_FIELDS[path]
        return _has_fields(method.request_class, request_fields) and _has_fields(
            method.response_class, response_fields
        )

    def _response(self, path: str, **fields: Any) -> Message:
        return self.catalog.methods[path].response_class(**fields)

    def _maintenance_check(self, request: Message) -> Message:
        start, end = self.rollover
        return self._response(
            MAINTENANCE_CHECK,
            maintenance_mode=self.maintenance is not None,
            rollover_scheduled=start is not None,
            rollover_start=rfc3339(start) if start else "",
            rollover_end=rfc3339(end) if end else "",
            notice=self.notice,
        )

    def _transfer(self, request: Message) -> Message:
        source = _required(request.from_account, "from_account")
        target = _required(request.to_account, "to_account")
        amount = positive_decimal(request.amount, "amount")
        if amount > self.transfer_limit:
            raise Status(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"transaction limit exceeded: amount {amount} is over the account's limit of "
                f"{self.transfer_limit}; ask Recrypt support to raise the limit",
            )
        currency = str(request.currency)
        self.balances[(source, currency)] -= amount
        self.balances[(target, currency)] += amount
        return self._response(
            TRANSFER, transfer_id=str(uuid.uuid4()), executed_at=rfc3339(self._clock())
        )

    def _get_balances(self, request: Message) -> Message:
        response = self._response(GET_BALANCES)
        for (account, currency), amount in sorted(self.balances.items()):
            if account == request.account:
                response.balances.add(currency=currency, amount=str(amount))
        return response

    def _place_order(self, request: Message) -> Message:
        account = _required(request.account, "account")
        _required(request.market, "market")
        quantity = str(positive_decimal(request.quantity, "quantity"))
        market_order = request.type == _enum_number(request, "type", "ORDER_TYPE_MARKET")
        if not market_order:
            positive_decimal(request.limit_price, "limit_price")
        status = "ORDER_STATUS_FILLED" if market_order else "ORDER_STATUS_OPEN"
        order_id = str(uuid.uuid4())
        order = _Order(account, str(getattr(request, KEY_FIELD)), quantity, status)
        self._orders[order_id] = order
        self._update(order_id, order, quantity if market_order else "0")
        response = self._response(PLACE_ORDER, order_id=order_id)
        response.status = _enum_number(response, "status", status)
        return response

    def _cancel_order(self, request: Message) -> Message:
        order = self._orders.get(request.order_id)
        open_here = order is not None and order.status == "ORDER_STATUS_OPEN"
        if order is None or not open_here or request.account not in ("", order.account):
            raise Status(
                grpc.StatusCode.FAILED_PRECONDITION, f"order not open: {request.order_id!r}"
            )
        order.status = "ORDER_STATUS_CANCELLED"
        self._update(request.order_id, order, "0")
        response = self._response(CANCEL_ORDER, order_id=request.order_id)
        response.status = _enum_number(response, "status", order.status)
        return response

    def _update(self, order_id: str, order: _Order, filled: str) -> None:
        """Publish an OrderUpdate for the order's account, when the stream method is served."""
        stream = self.catalog.methods.get(STREAM_ORDER_UPDATES)
        if stream is None or STREAM_ORDER_UPDATES not in self.logic:
            return
        update_class = stream.response_class
        update = update_class(order_id=order_id, filled_quantity=filled, at=rfc3339(self._clock()))
        update.status = _enum_number(update_class, "status", order.status)
        setattr(update, KEY_FIELD, order.key)
        self._publish(order.account, update)
