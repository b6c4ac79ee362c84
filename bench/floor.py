"""The floor: CPU per call of gRPC's Python client alone, in the shapes the daemon could use.

Run by ``python -m bench --only floor`` in its own process (the simulator runs in the bench's
process, so its CPU is not counted here); prints one JSON line. Requests are built before the
clock starts: what is measured is the client (call objects, serialisation, completion queue,
its threads), nothing of ours. CPU is ``time.process_time()``: every thread of this process.

Shapes: ``futures`` (sync ``future()`` for a batch, then ``result()`` each in order),
``futures-last-first`` (the same, waiting first for the last call started; tried in the daemon
without a gain over a whole drain),
``futures-registered`` (``futures`` with the method registered with the channel),
``aio`` (``grpc.aio`` on one event loop, a batch gathered at a time), ``threads`` (blocking
calls from a pool of threads, one batch at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from outbox.descriptors import Catalog, build_request

TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"
PAYLOAD = {"fromAccount": "floor", "toAccount": "b", "amount": "1.00"}
Requests = list[Any]


def requests(calls: int) -> Requests:
    method = Catalog.load().submittable(TRANSFER)
    return [build_request(method, PAYLOAD, str(uuid.uuid4())) for _ in range(calls)]


def _unary(channel: Any, registered: bool = False) -> Any:
    method = Catalog.load().submittable(TRANSFER)
    return channel.unary_unary(
        TRANSFER,
        request_serializer=method.request_class.SerializeToString,
        response_deserializer=method.response_class.FromString,
        _registered_method=registered,
    )


def futures(target: str, metadata: Any, batches: list[Requests], registered: bool = False) -> None:
    with grpc.insecure_channel(target) as channel:
        call = _unary(channel, registered)
        for batch in batches:
            pending = [call.future(r, timeout=30, metadata=metadata) for r in batch]
            for future in pending:
                future.result()


def futures_last_first(target: str, metadata: Any, batches: list[Requests]) -> None:
    """As ``futures``, waiting first for the last call started (``GrpcClient.send_all``)."""
    with grpc.insecure_channel(target) as channel:
        call = _unary(channel)
        for batch in batches:
            pending = [call.future(r, timeout=30, metadata=metadata) for r in batch]
            pending[-1].exception()
            for future in pending:
                future.result()


def threads(target: str, metadata: Any, batches: list[Requests]) -> None:
    with grpc.insecure_channel(target) as channel:
        call = _unary(channel)
        with ThreadPoolExecutor(len(batches[0])) as pool:
            for batch in batches:
                list(pool.map(lambda r: call(r, timeout=30, metadata=metadata), batch))


def aio(target: str, metadata: Any, batches: list[Requests]) -> None:
    async def run() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            call = _unary(channel)
            for batch in batches:
                await asyncio.gather(*(call(r, timeout=30, metadata=metadata) for r in batch))

    asyncio.run(run())


def futures_registered(target: str, metadata: Any, batches: list[Requests]) -> None:
    """As ``futures``, the method registered with the channel once (``_registered_method``,
    as generated stubs do): the C core no longer interns the method name per call."""
    futures(target, metadata, batches, registered=True)


SHAPES: dict[str, Callable[[str, Any, list[Requests]], None]] = {
    "futures": futures,
    "futures-last-first": futures_last_first,
    "futures-registered": futures_registered,
    "aio": aio,
    "threads": threads,
}


def measure(shape: str, target: str, api_key: str, calls: int, batch: int) -> dict[str, float]:
    """CPU µs per call and calls/s of one shape; a warm-up batch is not counted."""
    metadata = (("apikey", api_key),)
    todo = requests(calls + batch)
    batches = [todo[i : i + batch] for i in range(0, len(todo), batch)]
    SHAPES[shape](target, metadata, batches[:1])  # warm-up: channel, imports, first call
    cpu, wall = time.process_time(), time.perf_counter()
    SHAPES[shape](target, metadata, batches[1:])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_us_per_call": round(cpu / calls * 1e6, 1), "rate": round(calls / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    result = {
        shape: measure(shape, args.target, args.api_key, args.calls, args.batch)
        for shape in args.shapes.split(",")
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
