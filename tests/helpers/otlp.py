"""An in-test OTLP/gRPC trace collector: the services export real spans to it."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    # Attribute values as Python values (lists for arrays); status code 2 = ERROR.
    attributes: dict = field(default_factory=dict, compare=False, repr=False)
    status: int = 0
    events: tuple[str, ...] = ()


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        got = []
        for rs in request.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), ""
            )
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(service, s.name, s.trace_id.hex(), s.span_id.hex(),
                             s.parent_span_id.hex(), s.kind,
                             {a.key: _value(a.value) for a in s.attributes}, s.status.code,
                             tuple(e.name for e in s.events))
                    )
        with self.lock:
            self.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpCollector:
    def __init__(self) -> None:
        self._servicer = _Collector()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self._servicer, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpCollector:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0)

    def spans(self) -> list[Span]:
        """Every span received so far."""
        with self._servicer.lock:
            return list(self._servicer.spans)

    def trace(self, trace_id: str, until, timeout: float = 10.0) -> list[Span]:
        """Spans of one trace, once ``until(spans)`` holds (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._servicer.lock:
                spans = [s for s in self._servicer.spans if s.trace_id == trace_id]
            if until(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)
