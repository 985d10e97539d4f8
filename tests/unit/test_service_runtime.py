"""How every service process runs: on which event loop, and what its garbage collector walks
once it serves."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref

import pytest
import uvloop

from fmapi_common import entry, server
from fmapi_common.config import ServiceConfig
from fmapi_gateway.config import GatewayConfig
from fmapi_routing.config import RoutingConfig


def _loop_type(monkeypatch, config_cls, name: str) -> type:
    """The type of event loop ``run_service`` serves ``config_cls``'s service on."""
    seen: list[type] = []

    async def serve(config):
        seen.append(type(asyncio.get_running_loop()))

    monkeypatch.setattr(sys, "argv", [f"fmapi-{name}"])
    monkeypatch.setattr(entry, "setup_logging", lambda *a: None)
    entry.run_service(config_cls, serve, name)
    return seen[0]


@pytest.fixture
def routing_env(monkeypatch):
    monkeypatch.setenv("FMAPI_ROUTING_ENDPOINTS_FILE", "x.yaml")
    monkeypatch.setenv("FMAPI_ROUTING_REDIS_URL", "redis://x")
    monkeypatch.setenv("FMAPI_ROUTING_INSECURE", "true")


def test_a_service_runs_on_uvloop_only_when_its_config_says_so(monkeypatch, routing_env):
    assert not issubclass(_loop_type(monkeypatch, RoutingConfig, "routing"), uvloop.Loop)
    monkeypatch.setenv("FMAPI_ROUTING_UVLOOP", "true")
    assert issubclass(_loop_type(monkeypatch, RoutingConfig, "routing"), uvloop.Loop)


def test_the_gateway_runs_on_uvloop_unless_told_otherwise(monkeypatch):
    for k, v in {"ROUTING_ADDR": "x:1", "AUTH_ADDR": "x:2", "QUOTA_ADDR": "x:3",
                 "IDENTITY_KEY": "k" * 32, "INSECURE": "true"}.items():
        monkeypatch.setenv(f"FMAPI_GATEWAY_{k}", v)
    assert issubclass(_loop_type(monkeypatch, GatewayConfig, "gateway"), uvloop.Loop)
    monkeypatch.setenv("FMAPI_GATEWAY_UVLOOP", "false")
    assert not issubclass(_loop_type(monkeypatch, GatewayConfig, "gateway"), uvloop.Loop)


class _Node:
    other: _Node | None = None


@pytest.fixture
def unfrozen(monkeypatch):
    """A process that has not frozen its heap yet, and no automatic collection meanwhile (only
    the ones the test makes happen); both restored afterwards."""
    monkeypatch.setattr(server, "_frozen", False)
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    gc.unfreeze()
    if was_enabled:
        gc.enable()


async def test_going_to_serving_collects_the_garbage_and_freezes_what_lives_once(unfrozen):
    svc = await server.start_grpc_service(ServiceConfig(insecure=True), lambda s: [], policy={},
                                          serving=False)
    try:
        # A reference cycle nothing points to (garbage), and one that lives on.
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        dead = weakref.ref(a)
        del a, b
        kept = _Node()
        kept.other = kept
        frozen_before = gc.get_freeze_count()
        assert dead() is not None  # not collected yet

        await svc.set_serving(True)
        assert dead() is None  # the garbage was collected, not frozen
        assert gc.get_freeze_count() > frozen_before
        # What lives is out of the collector's sight: no collection walks it again.
        assert not any(o is kept for o in gc.get_objects())

        # Only the first time: serving again later (usage does, after its database came back)
        # neither collects nor freezes again.
        later = _Node()
        later.other = later
        count = gc.get_freeze_count()
        await svc.set_serving(False)
        await svc.set_serving(True)
        # (frozen objects may die meanwhile, so the count may drop; none is added)
        assert gc.get_freeze_count() <= count
        assert any(o is later for o in gc.get_objects())
    finally:
        await svc.server.stop(0)


# ------------------------------------------------------------------ tracing of internal calls

_TRACE_ID_METHOD = "/fmapi.test.Echo/TraceId"


def _trace_id_server(s) -> list[str]:
    """A method answering the trace id its call runs in (32 zeros: no span)."""
    import grpc
    from opentelemetry import trace

    async def trace_id(request: bytes, context) -> bytes:
        return format(trace.get_current_span().get_span_context().trace_id, "032x").encode()

    s.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "fmapi.test.Echo", {"TraceId": grpc.unary_unary_rpc_method_handler(trace_id)})])
    return ["fmapi.test.Echo"]


async def _trace_id_of_a_call(*, public: bool) -> str:
    """The trace id a call that sends a W3C ``traceparent`` runs in, on a service started as
    every fmapi service is, and sent through fmapi's own client channel."""
    from fmapi_common.channels import make_channel

    svc = await server.start_grpc_service(ServiceConfig(insecure=True), _trace_id_server,
                                          policy={}, public=public)
    try:
        async with make_channel(f"127.0.0.1:{svc.port}", None, "test") as ch:
            call = ch.unary_unary(_TRACE_ID_METHOD)
            sent = "4bf92f3577b34da6a3ce929d0e0e4736"
            got = (await call(b"", metadata=[("traceparent", f"00-{sent}-00f067aa0ba902b7-01")],
                              timeout=5)).decode()
            return "caller's" if got == sent else ("none" if set(got) == {"0"} else got)
    finally:
        await svc.server.stop(0)


@pytest.fixture
def no_exporter(monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


async def test_internal_calls_are_traced_only_when_the_process_exports_spans(no_exporter, monkeypatch):
    # Nobody receives the spans: no span per call (each cost both sides CPU), none made up.
    assert await _trace_id_of_a_call(public=False) == "none"
    # Exporting: the call's span continues the caller's trace.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert await _trace_id_of_a_call(public=False) == "caller's"


async def test_the_public_grpc_api_traces_every_call_even_without_an_exporter(no_exporter):
    # Its span's trace id is what the response's x-fmapi-trace-id tells the user.
    assert await _trace_id_of_a_call(public=True) == "caller's"


def test_a_process_that_exports_no_spans_records_none_but_keeps_trace_ids(no_exporter, monkeypatch):
    from opentelemetry import propagate

    from fmapi_common.telemetry import tracer_provider

    caller = "4bf92f3577b34da6a3ce929d0e0e4736"
    ctx = propagate.extract({"traceparent": f"00-{caller}-00f067aa0ba902b7-01"})
    quiet = tracer_provider("test").get_tracer("t")
    with quiet.start_as_current_span("request", context=ctx) as span:
        # Attributes nobody will receive are not kept; the trace id is still the caller's.
        assert not span.is_recording()
        assert format(span.get_span_context().trace_id, "032x") == caller
    with quiet.start_as_current_span("request") as span:  # no caller: a trace id of its own
        assert span.get_span_context().trace_id != 0

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    exporting = tracer_provider("test")
    try:
        with exporting.get_tracer("t").start_as_current_span("request", context=ctx) as span:
            assert span.is_recording()
            assert format(span.get_span_context().trace_id, "032x") == caller
    finally:
        exporting.shutdown()


@pytest.mark.parametrize("sampler, arg, ratio", [
    (None, None, 1.0),
    ("parentbased_traceidratio", "0.1", 0.1),
    ("traceidratio", "0.25", 0.25),
    ("always_off", None, 0.0),
    ("parentbased_always_on", None, 1.0),
    ("traceidratio", None, 1.0),
    ("traceidratio", "1.5", 1.0),  # not a ratio: every request, with a warning
    ("traceidratio", "a tenth", 1.0),
    ("jaeger_remote", None, 1.0),  # a sampler fmapi does not know: every request
])
def test_the_share_of_requests_traced_comes_from_the_standard_sampler_variables(sampler, arg,
                                                                                 ratio):
    from fmapi_common.telemetry import sampling_ratio

    env = {k: v for k, v in (("OTEL_TRACES_SAMPLER", sampler), ("OTEL_TRACES_SAMPLER_ARG", arg))
           if v is not None}
    assert sampling_ratio(env) == ratio


def test_a_sampled_process_follows_envoys_decision_and_samples_its_own_roots(monkeypatch):
    """A request Envoy traced is recorded and one it did not is not, whatever the ratio (a
    service deciding on its own would cut traces in pieces); spans with no parent (background
    work) are sampled at the ratio."""
    from opentelemetry import propagate

    from fmapi_common.telemetry import tracer_provider

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    for ratio, parent_flag, recorded in (("0", "01", True), ("1", "00", False)):
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", ratio)
        provider = tracer_provider("test")
        try:
            ctx = propagate.extract({"traceparent": f"00-{trace_id}-00f067aa0ba902b7-{parent_flag}"})
            with provider.get_tracer("t").start_as_current_span("request", context=ctx) as span:
                assert span.is_recording() is recorded
            with provider.get_tracer("t").start_as_current_span("background") as span:
                assert span.is_recording() is (ratio == "1")
        finally:
            provider.shutdown()
