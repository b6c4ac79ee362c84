"""The cost of tracing on the drain (``./dev bench --only drain --tracing``): the same drain
with tracing off, on, and on with one trace in ten sampled (``parentbased_traceidratio``
0.1), alternated, in one run against the same simulator and database.

On means what a production daemon with the ``otel`` extra does: the SDK, a
``BatchSpanProcessor`` (its defaults) and the OTLP/gRPC exporter, sending every span to a
local OTLP sink (``Sink``: a gRPC TraceService in this process that counts what it receives
and drops it). So the figure includes making, batching, encoding and exporting each span;
the sink's own work runs in this process, not the daemon's, as a collector's would.
"""

from __future__ import annotations

import argparse
import statistics
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from outbox.simulator import Simulator

#: drain(sim, args, env) → its result (``bench.__main__.drain``)
Drain = Callable[[Simulator, argparse.Namespace, dict[str, str]], dict[str, Any]]
OFF: dict[str, str] = {}  # no OTEL_* at all (the bench strips its own): the daemon's default


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that counts spans and keeps none."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(  # the OTLP service's method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self._lock:
            self.spans += count
        return trace_service_pb2.ExportTraceServiceResponse()


@contextmanager
def otlp_sink() -> Iterator[tuple[Sink, str]]:
    """A sink on loopback, and the endpoint for ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``."""
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield sink, f"http://127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


def overhead(sim: Simulator, args: argparse.Namespace, drain: Drain) -> dict[str, object]:
    """``--tracing-rounds`` drains off, on, and on with 10% of traces sampled, alternated;
    rows/s and CPU µs/row of each (medians), and the spans the sink received."""
    with otlp_sink() as (sink, endpoint):
        on = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
            "OTEL_SERVICE_NAME": "outbox-bench",
        }
        sampled = on | {
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        }
        modes = {"off": OFF, "on": on, "sampled_10pct": sampled}
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for _ in range(args.tracing_rounds):
            for mode, env in modes.items():
                runs[mode].append(drain(sim, args, env))
                print(f"  tracing {mode}: {runs[mode][-1]['rate']} rows/s", flush=True)
        exported = sink.spans
    out: dict[str, object] = {"rows": args.rows, "rounds": args.tracing_rounds}
    for mode, done in runs.items():
        out[f"{mode}_rates"] = [r["rate"] for r in done]
        out[f"{mode}_rate_median"] = statistics.median(r["rate"] for r in done)
        out[f"{mode}_cpu_us_per_row"] = statistics.median(r["cpu_us_per_row"] for r in done)
    for mode in ("on", "sampled_10pct"):
        change = float(out[f"{mode}_rate_median"]) / float(out["off_rate_median"]) - 1  # type: ignore[arg-type]
        out[f"{mode}_rate_change_pct"] = round(change * 100, 1)
        added = float(out[f"{mode}_cpu_us_per_row"]) - float(out["off_cpu_us_per_row"])  # type: ignore[arg-type]
        out[f"{mode}_cpu_us_per_row_added"] = round(added, 1)
    out["spans_exported"] = exported  # every "on" row, and about a tenth of the sampled ones
    return out
