"""Observability end to end: one trace from Envoy down to the vLLM engine (real spans, collected
in the test as the OpenTelemetry demo's trace tests do), and Prometheus metrics that add up to
what the clients were told."""

from __future__ import annotations

import json
import re
import secrets
import time

import grpc
import httpx
import pytest

from fmapi.inference.v1 import inference_pb2 as pb
from fmapi.inference.v1 import inference_pb2_grpc

SERVER, CLIENT = 2, 3  # OTLP span kinds
PROMPT = "a secret prompt nobody should see in a span"


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent, f"00-{trace_id}-{parent}-01"


def _one(spans, **match):
    found = [s for s in spans if all(
        (match[k](getattr(s, k)) if callable(match[k]) else getattr(s, k) == match[k]) for k in match)]
    assert found, f"no span with {match} in {[(s.service, s.name, s.kind) for s in spans]}"
    return found[0]


def _no_text(spans, *texts: str) -> None:
    for s in spans:
        for key, value in s.attributes.items():
            assert not any(t in str(value) for t in texts), f"{s.service}/{s.name} {key} holds text"


def _chain(spans, trace_parent: str, gateway_name) -> dict:
    """Envoy's server span continues the caller's; ext_authz is Envoy's child; the gateway's
    server span is Envoy's child; generation hangs off the gateway's client span, and quota off
    the generation server's (it counts the request and admits it, before the engine runs it);
    the engine's request span is the generation call's child. Returns the spans by role."""
    by_id = {s.span_id: s for s in spans}
    envoy = _one(spans, service="envoy", kind=SERVER)
    assert envoy.parent_id == trace_parent  # continues the caller's trace
    authz = _one(spans, service="envoy", kind=CLIENT, name=lambda n: "auth" in n.lower() or "Check" in n)
    assert authz.parent_id == envoy.span_id
    gateway = _one(spans, service="gateway", kind=SERVER, name=gateway_name)
    assert gateway.parent_id == envoy.span_id
    out = {"envoy": envoy, "authz": authz, "gateway": gateway}
    for service, method in (("generation", "Generate"), ("quota", "Admit")):
        server = _one(spans, service=service, kind=SERVER, name=lambda n, m=method: m in n)
        client_span = by_id[server.parent_id]
        caller, parent = (("gateway", gateway) if service == "generation"
                          else ("generation", out["generation"]))
        assert client_span.service == caller and client_span.kind == CLIENT
        assert client_span.parent_id == parent.span_id
        out[service] = server
    assert not [s for s in spans if "CountTokens" in s.name]  # counted where it ran
    engine = _one(spans, name="llm_request")
    assert engine.parent_id == out["generation"].span_id
    assert engine.attributes["gen_ai.usage.completion_tokens"] == 6
    out["engine"] = engine
    return out


def _complete(spans) -> bool:
    names = {(s.service, s.kind) for s in spans} | {(s.name, 0) for s in spans}
    return {("envoy", SERVER), ("gateway", SERVER), ("quota", SERVER), ("generation", SERVER),
            ("llm_request", 0)} <= names


def _check_genai(gateway, *, prompt_tokens: int, completion_tokens: int, principal: str, rid: str):
    a = gateway.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "tiny"
    assert a["gen_ai.usage.input_tokens"] == prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == completion_tokens
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.request.max_tokens"] == 6
    assert a["fmapi.endpoint"] == "o-chat" and a["fmapi.principal"] == principal
    assert a["fmapi.request_id"] == rid
    assert "gen_ai.first_token" in gateway.events


def test_a_streaming_chat_is_one_trace_from_envoy_to_the_engine(system, otlp, http):
    trace_id, parent, tp = _traceparent()
    body = {"model": "o-chat", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    usage = None
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"traceparent": tp}) as r:
        assert r.status_code == 200
        assert r.headers["x-fmapi-trace-id"] == trace_id  # a user hands this to an SRE
        rid = r.headers["x-request-id"]
        for line in r.iter_lines():
            if line.startswith("data: {") and '"choices":[]' in line.replace(" ", ""):
                usage = json.loads(line[6:])["usage"]
    assert usage is not None
    spans = otlp.trace(trace_id, _complete)
    roles = _chain(spans, parent, lambda n: n.startswith("POST /v1/chat/completions"))
    _check_genai(roles["gateway"], prompt_tokens=usage["prompt_tokens"],
                 completion_tokens=usage["completion_tokens"], principal="admin", rid=rid)
    _no_text(spans, PROMPT)


def test_a_grpc_chat_is_one_trace_too(system, otlp):
    trace_id, parent, tp = _traceparent()
    md = (("authorization", f"Bearer {system.admin_token}"), ("traceparent", tp))
    with grpc.insecure_channel(f"127.0.0.1:{system.http_port}") as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        call = stub.Chat(pb.ChatRequest(endpoint="o-chat", messages=[pb.Message(role="user", content=PROMPT)],
                                        sampling=pb.Sampling(max_tokens=6, ignore_eos=True)),
                         metadata=md, timeout=60)
        parts = list(call)
        meta = dict(call.initial_metadata())
    assert meta["x-fmapi-trace-id"] == trace_id
    spans = otlp.trace(trace_id, _complete)
    roles = _chain(spans, parent, lambda n: n.endswith("InferenceService/Chat"))
    u = parts[-1].usage
    _check_genai(roles["gateway"], prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                 principal="admin", rid=roles["gateway"].attributes["fmapi.request_id"])
    _no_text(spans, PROMPT)


def test_a_request_refused_by_ext_authz_has_its_trace_marked_as_an_error(system, otlp, anon):
    trace_id, parent, tp = _traceparent()
    r = anon.post("/v1/chat/completions", json={"model": "o-chat", "messages": []},
                  headers={"traceparent": tp, "authorization": "Bearer fmapi_not-a-token"})
    assert r.status_code == 401

    def done(spans):
        return any(s.service == "auth" for s in spans) and any(s.service == "envoy" for s in spans)

    spans = otlp.trace(trace_id, done)
    envoy = _one(spans, service="envoy", kind=SERVER)
    assert envoy.parent_id == parent
    check = _one(spans, service="auth", kind=SERVER)
    assert check.status == 2  # ERROR: the request was refused
    assert check.attributes["fmapi.authz.decision"] == "unauthenticated"
    assert not any(s.service == "gateway" for s in spans)  # it never got past Envoy
    _no_text(spans, "fmapi_not-a-token")


# ---------------------------------------------------------------- metrics


def _samples(port: int, path: str = "/metrics") -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _service(system, service: str) -> dict[tuple, float]:
    """Every replica's samples of ``service`` (``gateway``, ``gateway-2``, ...), summed."""
    out: dict[tuple, float] = {}
    for key, port in system.ports.items():
        if re.fullmatch(rf"{re.escape(service)}(-\d+)?-metrics", key):
            for k, v in _samples(port).items():
                out[k] = out.get(k, 0.0) + v
    assert out, f"no metrics port for {service}"
    return out


def _value(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == val for k, val in labels.items()))


def test_after_a_known_workload_the_metrics_add_up(system, http, anon):
    # Summed over replicas (FMAPI_TEST_REPLICAS runs this on several of each).
    before, before_q = _service(system, "gateway"), _service(system, "quota")
    before_auth = _service(system, "auth")
    told = {"prompt": 0, "completion": 0}
    streams, embeds = 3, 2
    for i in range(streams):
        with http.stream("POST", "/v1/chat/completions", json={
                "model": "o-chat", "messages": [{"role": "user", "content": f"count {i}"}],
                "max_tokens": 4 + i, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and '"choices":[]' in line.replace(" ", ""):
                    u = json.loads(line[6:])["usage"]
                    told["prompt"] += u["prompt_tokens"]
                    told["completion"] += u["completion_tokens"]
    for i in range(embeds):
        r = http.post("/v1/embeddings", json={"model": "o-embed", "input": ["one", "two", f"three {i}"]})
        assert r.status_code == 200
        told["embed_prompt"] = told.get("embed_prompt", 0) + r.json()["usage"]["prompt_tokens"]
    statuses = [http.post("/v1/embeddings", json={"model": "o-limited", "input": "x"}).status_code
                for _ in range(2)]
    assert statuses == [200, 429]
    assert anon.post("/v1/embeddings", json={"model": "o-embed", "input": "x"}).status_code == 401

    def delta(name: str, **labels) -> float:
        return _value(_service(system, "gateway"), name, **labels) - _value(before, name, **labels)

    deadline = time.monotonic() + 10  # the last stream is counted as it closes, just after [DONE]
    while delta("fmapi_requests_total", endpoint="o-chat") < streams:
        assert time.monotonic() < deadline, "the gateway's counters never caught up"
        time.sleep(0.1)
    assert delta("fmapi_requests_total", endpoint="o-chat", status="200", principal_kind="user") == streams
    assert delta("fmapi_requests_total", endpoint="o-chat") == streams
    assert delta("fmapi_requests_total", endpoint="o-embed", status="200") == embeds
    assert delta("fmapi_requests_total", endpoint="o-limited", status="200") == 1
    assert delta("fmapi_requests_total", endpoint="o-limited", status="429") == 1
    assert delta("fmapi_prompt_tokens_total", endpoint="o-chat") == told["prompt"]
    assert delta("fmapi_generation_tokens_total", endpoint="o-chat") == told["completion"] == 4 + 5 + 6
    assert delta("fmapi_prompt_tokens_total", endpoint="o-embed") == told["embed_prompt"]
    assert delta("fmapi_time_to_first_token_seconds_count", endpoint="o-chat") == streams
    assert delta("fmapi_time_per_output_token_seconds_count", endpoint="o-chat") == streams
    assert delta("fmapi_e2e_request_latency_seconds_count", endpoint="o-embed") == embeds
    # quota: the refusal, by the kind of limit that refused it
    q = _service(system, "quota")
    assert _value(q, "fmapi_quota_refusals_total", endpoint="o-limited", limit="requests") - \
        _value(before_q, "fmapi_quota_refusals_total", endpoint="o-limited", limit="requests") == 1
    a = _service(system, "auth")
    assert _value(a, "fmapi_authz_decisions_total", decision="unauthenticated") > \
        _value(before_auth, "fmapi_authz_decisions_total", decision="unauthenticated")
    # the engine's own (vLLM's names), the embedding batcher's, routing's replica count
    g = _samples(system.ports["generation-tiny-metrics"])
    assert _value(g, "vllm:time_to_first_token_seconds_count") >= streams
    assert ("vllm:num_requests_waiting", (("engine", "0"), ("model_name", "tiny"))) in g or \
        any(n == "vllm:num_requests_waiting" for n, _ in g)
    assert any(n == "vllm:kv_cache_usage_perc" for n, _ in g)
    e = _service(system, "embedding")
    assert _value(e, "fmapi_embedding_batch_size_count") >= embeds
    # Every routing replica counts the same one live model server.
    assert _value(_samples(system.ports["routing-metrics"]), "fmapi_model_replicas", model="tiny") == 1


def test_envoys_stats_are_exported_on_an_internal_port_only(system):
    port = system.ports["envoy-metrics"]
    r = httpx.get(f"http://127.0.0.1:{port}/stats/prometheus", timeout=5)
    assert r.status_code == 200 and "envoy_http_downstream_rq_total" in r.text
    # Nothing else of the admin interface is reachable there.
    for method, path in (("GET", "/config_dump"), ("POST", "/quitquitquit"), ("GET", "/stats"),
                         ("POST", "/stats/prometheus")):
        assert httpx.request(method, f"http://127.0.0.1:{port}{path}", timeout=5).status_code == 404
    # And not through the public listener either.
    assert httpx.get(f"{system.base_url}/stats/prometheus", timeout=5).status_code in (401, 404)


@pytest.fixture
def anon(system):
    with httpx.Client(base_url=system.base_url, timeout=30) as c:
        yield c


def test_an_endpoints_metrics_export_is_prometheus_text_for_admins_only(system, http, anon):
    # The export is the answering gateway's own; on replicas, a few requests reach every one.
    for _ in range(8):
        assert http.post("/v1/embeddings", json={"model": "o-embed", "input": "x"}).status_code == 200
    r = http.get("/api/2.0/serving-endpoints/o-embed/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]
    assert {s.labels["endpoint"] for s in samples} == {"o-embed"}  # nothing of other endpoints
    assert sum(s.value for s in samples if s.name == "fmapi_requests_total") >= 1
    assert http.get("/api/2.0/serving-endpoints/no-such/metrics").status_code == 404
    # A token that may query the endpoint but is no admin: 403.
    token = http.post("/api/2.0/token/create", json={"comment": "metrics", "endpoints": ["o-embed"],
                                                      "lifetime_seconds": 600}).json()["token_value"]
    r = anon.get("/api/2.0/serving-endpoints/o-embed/metrics", headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 403
