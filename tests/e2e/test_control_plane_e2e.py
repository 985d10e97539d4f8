"""The control plane from outside, on a system of its own with two gateway and two quota
replicas behind one Envoy: endpoints created, changed and deleted at run time through the
unmodified databricks-sdk and the CLI, every change binding on every replica within a second,
and no routing call on the request path."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import httpx
import pytest
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import NotFound
from databricks.sdk.service import serving

from fmapi.routing.v1 import routing_pb2 as pb
from fmapi.routing.v1 import routing_pb2_grpc
from fmapi_common.channels import make_channel
from fmapi_common.tls import ROUTING

ROUTING_READS = ("ResolveEndpoint", "GetEndpoint", "ListEndpoints", "ListReplicas")


@pytest.fixture(scope="module")
def cp(replicated):
    """The session's replicated system (tests/e2e/conftest.py): two gateways, two quota replicas."""
    return replicated


@pytest.fixture(scope="module")
def w(cp):
    """databricks-sdk, unmodified, pointed at Envoy with the admin token."""
    return WorkspaceClient(host=cp.base_url, token=cp.admin_token, auth_type="pat")


@pytest.fixture(scope="module")
def http(cp):
    with httpx.Client(base_url=cp.base_url, timeout=60,
                      headers={"authorization": f"Bearer {cp.admin_token}"}) as c:
        yield c


def _embed(http, endpoint: str) -> httpx.Response:
    return http.post(f"/serving-endpoints/{endpoint}/invocations", json={"input": "hello"})


def _served(http, endpoint: str, n: int) -> Counter:
    out = Counter()
    for _ in range(n):
        r = _embed(http, endpoint)
        out[r.headers.get("x-fmapi-served-model") if r.status_code == 200 else r.status_code] += 1
    return out


def _routing_reads(cp) -> float:
    return sum(cp.metric("routing", "fmapi_grpc_server_started_total", grpc_method=m)
               for m in ROUTING_READS)


def _eventually(check, timeout: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def test_databricks_sdk_manages_an_endpoint_at_run_time(cp, w, http):
    created = w.serving_endpoints.create(
        name="sdk-ep", description="made by the SDK",
        config=serving.EndpointCoreConfigInput(
            name="sdk-ep", served_entities=[serving.ServedEntityInput(entity_name="emb-a")]),
        tags=[serving.EndpointTag(key="team", value="search")],
    ).result()
    assert created.name == "sdk-ep" and created.state.ready == serving.EndpointStateReady.READY
    assert created.state.config_update == serving.EndpointStateConfigUpdate.NOT_UPDATING
    got = w.serving_endpoints.get("sdk-ep")
    assert got.task == "llm/v1/embeddings" and got.description == "made by the SDK"
    assert [t.as_dict() for t in got.tags] == [{"key": "team", "value": "search"}]
    assert _served(http, "sdk-ep", 5) == {"emb-a": 5}

    # A new config: the split moves to emb-b on every gateway replica at once.
    updated = w.serving_endpoints.update_config(
        "sdk-ep",
        served_entities=[serving.ServedEntityInput(entity_name="emb-a", name="a"),
                         serving.ServedEntityInput(entity_name="emb-b", name="b")],
        traffic_config=serving.TrafficConfig(routes=[
            serving.Route(served_model_name="a", traffic_percentage=0),
            serving.Route(served_model_name="b", traffic_percentage=100)]),
    ).result()
    assert updated.config.config_version == 2
    assert _served(http, "sdk-ep", 40) == {"emb-b": 40}

    # A rate limit set through put_ai_gateway binds within a second on both gateways (and both
    # quota replicas): exactly `calls` requests of a burst get through.
    # (Admit and Settle alternate on a gateway's round-robin channel: count every quota call.)
    quota_calls = {"grpc_service": "fmapi.quota.v1.QuotaService"}
    before = {q: cp.metric(q, "fmapi_grpc_server_started_total", **quota_calls)
              for q in ("quota", "quota-2")}
    put = w.serving_endpoints.put_ai_gateway("sdk-ep", rate_limits=[serving.AiGatewayRateLimit(
        key=serving.AiGatewayRateLimitKey.ENDPOINT, calls=6,
        renewal_period=serving.AiGatewayRateLimitRenewalPeriod.MINUTE)])
    assert [(r.key.value, r.calls) for r in put.rate_limits] == [("endpoint", 6)]
    statuses = Counter(_embed(http, "sdk-ep").status_code for _ in range(20))
    assert statuses == {200: 6, 429: 14}
    for q in ("quota", "quota-2"):  # both halves of the system took part
        assert cp.metric(q, "fmapi_grpc_server_started_total", **quota_calls) > before[q], q
    assert w.serving_endpoints.get("sdk-ep").ai_gateway.rate_limits[0].calls == 6

    w.serving_endpoints.delete("sdk-ep")
    with pytest.raises(NotFound):
        w.serving_endpoints.get("sdk-ep")
    r = _embed(http, "sdk-ep")
    assert r.status_code == 404 and "sdk-ep" in r.json()["message"]


def test_a_traffic_split_changed_at_run_time_moves_traffic(cp, w, http):
    w.serving_endpoints.create(name="split", config=serving.EndpointCoreConfigInput(
        name="split",
        served_entities=[serving.ServedEntityInput(entity_name="emb-a", name="a"),
                         serving.ServedEntityInput(entity_name="emb-b", name="b")],
        traffic_config=serving.TrafficConfig(routes=[
            serving.Route(served_model_name="a", traffic_percentage=70),
            serving.Route(served_model_name="b", traffic_percentage=30)]))).result()
    try:
        counts = _served(http, "split", 300)
        assert set(counts) == {"emb-a", "emb-b"} and 0.6 < counts["emb-a"] / 300 < 0.8, counts
        w.serving_endpoints.update_config("split", served_entities=[
            serving.ServedEntityInput(entity_name="emb-a", name="a"),
            serving.ServedEntityInput(entity_name="emb-b", name="b")],
            traffic_config=serving.TrafficConfig(routes=[
                serving.Route(served_model_name="a", traffic_percentage=100),
                serving.Route(served_model_name="b", traffic_percentage=0)])).result()
        t0 = time.monotonic()
        assert _served(http, "split", 200) == {"emb-a": 200}
        assert time.monotonic() - t0 < 60
    finally:
        w.serving_endpoints.delete("split")


def test_a_fallback_configured_at_run_time_takes_over(cp, w, http):
    # "emb-gone" is a model fmapi knows (a server registered it once) with no replica now.
    async def register_and_leave():
        ch = make_channel(f"127.0.0.1:{cp.ports['routing']}", cp.tls_files("embedding"), ROUTING)
        stub = routing_pb2_grpc.RoutingServiceStub(ch)
        reg = await stub.RegisterReplica(pb.RegisterReplicaRequest(replica=pb.Replica(
            address="127.0.0.1:9", models=["emb-gone"], kind=pb.REPLICA_KIND_EMBEDDING)))
        await stub.DeregisterReplica(pb.DeregisterReplicaRequest(id=reg.id))
        await ch.close()
    asyncio.run(register_and_leave())
    w.serving_endpoints.create(name="fb", config=serving.EndpointCoreConfigInput(
        name="fb",
        served_entities=[serving.ServedEntityInput(entity_name="emb-gone", name="primary"),
                         serving.ServedEntityInput(entity_name="emb-b", name="spare")],
        traffic_config=serving.TrafficConfig(routes=[
            serving.Route(served_model_name="primary", traffic_percentage=100),
            serving.Route(served_model_name="spare", traffic_percentage=0)])))
    try:
        r = _embed(http, "fb")
        assert r.status_code == 503 and "no live replica" in r.json()["message"]
        w.serving_endpoints.put_ai_gateway("fb", fallback_config=serving.FallbackConfig(enabled=True))
        assert _eventually(lambda: _embed(http, "fb").status_code == 200)
        assert _served(http, "fb", 20) == {"emb-b": 20}
        # fmapi's extension: another endpoint as the last resort.
        r = http.put("/api/2.0/serving-endpoints/fb/ai-gateway", json={
            "fallback_config": {"enabled": False, "endpoints": ["all-minilm-l6-v2"]}})
        assert r.status_code == 200, r.text
        assert r.json()["fallback_config"] == {"enabled": False, "endpoints": ["all-minilm-l6-v2"]}
        assert _served(http, "fb", 10) == {"all-minilm-l6-v2": 10}
    finally:
        w.serving_endpoints.delete("fb")


@pytest.mark.parametrize("path, body, field, words", [
    ("config", {"served_entities": [{"entity_name": "emb-a", "name": "a"},
                                    {"entity_name": "emb-b", "name": "b"}],
                "traffic_config": {"routes": [{"served_model_name": "a", "traffic_percentage": 50},
                                              {"served_model_name": "b", "traffic_percentage": 40}]}},
     "config.traffic_config.routes", "add up to 100"),
    ("config", {"served_entities": [{"entity_name": "no-such-model"}]},
     "config.served_entities[0].entity_name", "unknown"),
    ("config", {"served_entities": []}, "config.served_entities", "at least one"),
    ("ai-gateway", {"fallback_config": {"enabled": True, "endpoints": ["ghost"]}}, "endpoints",
     "ghost"),
    ("ai-gateway", {"rate_limits": [{"key": "user_group", "calls": 1, "renewal_period": "minute"}]},
     "ai_gateway.rate_limits[0].key", "user groups"),
    ("ai-gateway", {"rate_limits": [{"key": "endpoint", "calls": 1, "renewal_period": "day"}]},
     "ai_gateway.rate_limits[0].renewal_period", "minute"),
    ("ai-gateway", {"rate_limits": [{"key": "user", "calls": -3, "renewal_period": "minute"}]},
     "ai_gateway.rate_limits[0].calls", "whole number"),
])
def test_invalid_updates_are_refused_and_the_old_config_keeps_serving(http, path, body, field, words):
    r = http.put(f"/api/2.0/serving-endpoints/all-minilm-l6-v2/{path}", json=body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert words in err["message"] and err["error"]["param"] == field, err
    assert _served(http, "all-minilm-l6-v2", 3) == {"all-minilm-l6-v2": 3}
    ep = http.get("/api/2.0/serving-endpoints/all-minilm-l6-v2").json()
    assert ep["config"]["config_version"] == 1 and ep["ai_gateway"]["rate_limits"] == []


def test_writes_need_an_admin_token(cp, http):
    tok = http.post("/api/2.0/token/create", json={"comment": "reader",
                                                   "endpoints": ["all-minilm-l6-v2"]}).json()
    headers = {"authorization": f"Bearer {tok['token_value']}"}
    with httpx.Client(base_url=cp.base_url, timeout=30, headers=headers) as reader:
        for method, path in [("POST", "/api/2.0/serving-endpoints"),
                             ("PUT", "/api/2.0/serving-endpoints/all-minilm-l6-v2/config"),
                             ("PUT", "/api/2.0/serving-endpoints/all-minilm-l6-v2/ai-gateway"),
                             ("DELETE", "/api/2.0/serving-endpoints/all-minilm-l6-v2"),
                             ("POST", "/api/2.0/fmapi/endpoints/apply")]:
            r = reader.request(method, path, json={})
            assert r.status_code == 403, (method, path, r.text)
        assert reader.get("/api/2.0/serving-endpoints/all-minilm-l6-v2/openapi").status_code == 200
    assert _served(http, "all-minilm-l6-v2", 1) == {"all-minilm-l6-v2": 1}


def test_openapi_document_of_an_endpoint(http):
    doc = http.get("/api/2.0/serving-endpoints/all-minilm-l6-v2/openapi").json()
    assert doc["openapi"].startswith("3.")
    (path,) = doc["paths"]
    assert "all-minilm-l6-v2" in path and "post" in doc["paths"][path]


def test_the_gateway_makes_no_routing_call_per_request(cp, http):
    _served(http, "all-minilm-l6-v2", 2)  # warm
    before = _routing_reads(cp)
    assert _served(http, "all-minilm-l6-v2", 50) == {"all-minilm-l6-v2": 50}
    assert http.get("/api/2.0/serving-endpoints").status_code == 200
    assert http.get("/v1/models").status_code == 200
    assert _routing_reads(cp) == before
    # The counter does count: routing's own API still answers when asked directly.
    async def resolve():
        ch = make_channel(f"127.0.0.1:{cp.ports['routing']}", cp.tls_files("gateway"), ROUTING)
        await routing_pb2_grpc.RoutingServiceStub(ch).ResolveEndpoint(
            pb.ResolveEndpointRequest(name="all-minilm-l6-v2"))
        await ch.close()
    asyncio.run(resolve())
    assert _routing_reads(cp) == before + 1


def test_cli_applies_lists_and_sets_limits(cp, tmp_path, capsys):
    from fmapi_cli.main import main

    common = ["--url", cp.base_url, "--token", cp.admin_token]
    f = tmp_path / "eps.yaml"
    f.write_text("""
endpoints:
  - name: cli-ep
    task: llm/v1/embeddings
    served_entities: [{model: emb-a}]
    limits: {requests_per_minute: 100}
""")
    assert main(["endpoints", "apply", "-f", str(f), *common]) == 0
    assert "created" in capsys.readouterr().out
    assert main(["endpoints", "apply", "-f", str(f), *common]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert main(["endpoints", "limits", "set", "cli-ep", "--key", "endpoint", "--calls", "3",
                 *common]) == 0
    capsys.readouterr()
    assert main(["endpoints", "list", *common]) == 0
    listing = capsys.readouterr().out
    assert "cli-ep" in listing and "all-minilm-l6-v2" in listing
    with httpx.Client(base_url=cp.base_url, timeout=30,
                      headers={"authorization": f"Bearer {cp.admin_token}"}) as c:
        assert Counter(_embed(c, "cli-ep").status_code for _ in range(5)) == {200: 3, 429: 2}
    assert main(["endpoints", "delete", "cli-ep", *common]) == 0
    assert main(["endpoints", "get", "cli-ep", *common]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_an_endpoint_retired_through_the_api_names_its_replacement(w, http):
    w.serving_endpoints.create(name="old-embed", config=serving.EndpointCoreConfigInput(
        name="old-embed", served_entities=[serving.ServedEntityInput(entity_name="emb-a")])).result()
    try:
        assert _embed(http, "old-embed").status_code == 200
        r = http.post("/api/2.0/fmapi/endpoints/old-embed/retire", json={"replacement": "ghost"})
        assert r.status_code == 400 and "ghost" in r.json()["message"]
        r = http.post("/api/2.0/fmapi/endpoints/old-embed/retire",
                      json={"replacement": "all-minilm-l6-v2"})
        assert r.status_code == 200 and r.json()["replacement"] == "all-minilm-l6-v2"
        r = _embed(http, "old-embed")
        assert r.status_code == 400 and "use 'all-minilm-l6-v2' instead" in r.json()["message"]
    finally:
        w.serving_endpoints.delete("old-embed")
