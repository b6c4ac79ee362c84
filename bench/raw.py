"""The ceiling: a bare asyncio gRPC client sending Transfers to the simulator.

Run by ``python -m bench`` in its own process; prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import grpc

from outbox.descriptors import Catalog, build_request

TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"


async def run(target: str, api_key: str, calls: int, concurrency: int) -> dict[str, float]:
    method = Catalog.load().submittable(TRANSFER)
    payload = {"fromAccount": "raw", "toAccount": "b", "amount": "1.00"}
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            TRANSFER,
            request_serializer=method.request_class.SerializeToString,
            response_deserializer=method.response_class.FromString,
        )
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(calls):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                request = build_request(method, payload, str(uuid.uuid4()))
                await call(request, metadata=(("apikey", api_key),), timeout=30)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"calls": calls, "seconds": elapsed, "rate": calls / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    result = asyncio.run(run(args.target, args.api_key, args.calls, args.concurrency))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
