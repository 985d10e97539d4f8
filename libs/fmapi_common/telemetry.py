"""OpenTelemetry set-up, done once per process.

Spans are exported over OTLP/gRPC when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the SDK reads the
standard ``OTEL_*`` variables); W3C trace context travels in gRPC metadata through the gRPC
instrumentation's interceptors and in HTTP headers through :func:`extract_http_context`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

_configured = False


def setup_telemetry(service_name: str) -> None:
    """Install the tracer provider for this process (idempotent)."""
    global _configured
    if _configured:
        return
    _configured = True
    if exporting():
        # Tracer providers that libraries make in this process (the vLLM engine's) read the
        # sampler from the environment: they follow Envoy's decision too.
        os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        os.environ["OTEL_TRACES_SAMPLER_ARG"] = repr(sampling_ratio())
    trace.set_tracer_provider(tracer_provider(service_name))
    logging.getLogger(__name__).debug("telemetry ready for %s", service_name)


def tracer_provider(service_name: str) -> TracerProvider:
    """The tracer provider of a process: exporting its spans over OTLP when
    :func:`exporting`, else recording none (sampler always-off): its spans still carry trace ids
    (a request's ``x-fmapi-trace-id``, a caller's trace continued), but their attributes and
    events cost nothing."""
    resource = Resource.create({"service.name": service_name})
    if not exporting():
        return TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # A request's spans follow Envoy's decision (it starts every request's trace, sampling
    # sampling_ratio() of them); a span with no parent (background work) is sampled at the
    # same ratio.
    provider = TracerProvider(resource=resource,
                              sampler=ParentBased(TraceIdRatioBased(sampling_ratio())))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def shutdown_telemetry() -> None:
    """Flush spans still buffered (called on graceful shutdown)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def otlp_traces_endpoint(env: Mapping[str, str] | None = None) -> str | None:
    """Where a process with environment ``env`` (this one's when None) exports spans (the
    standard OTLP variables), if anywhere."""
    env = os.environ if env is None else env
    return (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)


_RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
_SAMPLERS = {"always_on": 1.0, "parentbased_always_on": 1.0,
             "always_off": 0.0, "parentbased_always_off": 0.0}


def sampling_ratio(env: Mapping[str, str] | None = None) -> float:
    """The share of requests traced, from the standard ``OTEL_TRACES_SAMPLER`` and
    ``OTEL_TRACES_SAMPLER_ARG`` (every request when unset): Envoy samples that share (its
    ``random_sampling``) and every service follows Envoy's decision, so a request is traced
    across all its hops or not at all. Any sampler is taken as parent-based (a service deciding
    on its own would cut traces in pieces); one other than the ratio, always-on and always-off
    samplers traces every request."""
    env = os.environ if env is None else env
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in _SAMPLERS:
        return _SAMPLERS[sampler]
    if sampler not in _RATIO_SAMPLERS:
        if sampler:
            logging.getLogger(__name__).warning(
                "OTEL_TRACES_SAMPLER=%s is not one fmapi knows; tracing every request", sampler)
        return 1.0
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
    try:
        ratio = float(arg)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        logging.getLogger(__name__).warning(
            "OTEL_TRACES_SAMPLER_ARG=%s is not a ratio between 0 and 1; tracing every request", arg)
        return 1.0
    return ratio


def exporting() -> bool:
    """Whether this process sends its spans anywhere."""
    return otlp_traces_endpoint() is not None


def server_interceptors(*, exclude_methods: Iterable[str] = (), always: bool = False) -> list:
    """The tracing server interceptor: one span per call, continuing the caller's trace; none
    when this process exports no spans (unless ``always``): each traced call costs both sides
    about 0.1 ms of CPU for spans nobody receives.

    ``exclude_methods`` (full names, ``/package.Service/Method``) get no span: hot paths whose
    caller traces them itself, such as Envoy's external authorization ``Check``.
    """
    if not (always or exporting()):
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    excluded = frozenset(exclude_methods)
    if not excluded:
        return [aio_server_interceptor()]
    return [aio_server_interceptor(filter_=lambda details: details.method not in excluded)]


def client_interceptors() -> list:
    """The tracing client interceptors (they send the trace context on); none when this process
    exports no spans."""
    if not exporting():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def extract_http_context(headers: Mapping[str, str]):
    """The trace context a caller sent in ``traceparent``/``tracestate`` headers."""
    return propagate.extract(headers)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
