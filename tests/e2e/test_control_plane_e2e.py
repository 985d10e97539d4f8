"""The control plane from outside, on a system of its own with two gateway and two quota
replicas behind one Envoy: endpoints created, changed and deleted at run time through the
unmodified databricks-sdk and the CLI, every change binding on every replica within a second,
and no routing call on the request path.

A write answers once the gateway that took it holds the change; the other gateway's copy follows
within the second the issue allows. So a check that may land on either gateway comes after that
second (``_everywhere``), measured from the start of the write: these tests show the bound, and
do not race it."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter

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
GATEWAYS = ("gateway", "gateway-2")
QUOTAS = ("quota", "quota-2")
# Every change reaches every gateway, routing and quota replica within this (issue 9).
PROPAGATION_S = 1.0


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


def _everywhere(write):
    """Run a control-plane write and wait out PROPAGATION_S from its start: after that, every
    gateway replica serves the change (what follows may land on either). Returns the write's
    result."""
    t0 = time.monotonic()
    out = write()
    time.sleep(max(0.0, t0 + PROPAGATION_S - time.monotonic()))
    return out


class _GatewayCounts:
    """Each gateway replica's own count of the requests for one endpoint that ended there
    (``fmapi_requests_total{endpoint=...}``, every status), read from its /metrics: one
    connection kept open and no full parse, so reading both replicas after every request of a
    few hundred stays cheap (``System.metric`` is the general reader)."""

    def __init__(self, cp, endpoint: str) -> None:
        self._urls = {g: f"http://127.0.0.1:{cp.ports[f'{g}-metrics']}/metrics" for g in GATEWAYS}
        self._label = f'endpoint="{endpoint}"'
        self._client = httpx.Client(timeout=5)

    def read(self) -> dict[str, float]:
        out = {}
        for g, url in self._urls.items():
            out[g] = sum(float(line.rsplit(" ", 1)[1])
                         for line in self._client.get(url).text.splitlines()
                         if line.startswith("fmapi_requests_total{") and self._label in line)
        return out

    def close(self) -> None:
        self._client.close()


def _served_per_gateway(cp, http, endpoint: str, n: int) -> dict[str, Counter]:
    """``n`` requests one after another, each attributed to the gateway replica that counted it
    (its own request counter moved by one): per replica, what served them."""
    counts = _GatewayCounts(cp, endpoint)
    out = {g: Counter() for g in GATEWAYS}
    try:
        before = counts.read()
        for _ in range(n):
            r = _embed(http, endpoint)
            what = r.headers.get("x-fmapi-served-model") if r.status_code == 200 else r.status_code
            deadline = time.monotonic() + 5
            while True:  # a request is counted when it ends (its settlement)
                now = counts.read()
                moved = {g: now[g] - before[g] for g in GATEWAYS if now[g] != before[g]}
                if moved:
                    break
                assert time.monotonic() < deadline, f"no gateway counted a {r.status_code}"
                time.sleep(0.002)
            assert len(moved) == 1 and list(moved.values()) == [1], moved  # one replica, once
            out[next(iter(moved))][what] += 1
            before = now
    finally:
        counts.close()
    return out


def _binomial_ok(k: int, n: int, p: float) -> bool:
    """``k`` of ``n`` is within 4.5 standard deviations of Binomial(n, p)'s mean."""
    return abs(k - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))


def _known_without_replica(cp, model: str) -> None:
    """``model`` is one fmapi knows (a server registered it once) with no replica now."""
    async def register_and_leave():
        ch = make_channel(f"127.0.0.1:{cp.ports['routing']}", cp.tls_files("embedding"), ROUTING)
        stub = routing_pb2_grpc.RoutingServiceStub(ch)
        reg = await stub.RegisterReplica(pb.RegisterReplicaRequest(replica=pb.Replica(
            address="127.0.0.1:9", models=[model], kind=pb.REPLICA_KIND_EMBEDDING)))
        await stub.DeregisterReplica(pb.DeregisterReplicaRequest(id=reg.id))
        await ch.close()
    asyncio.run(register_and_leave())


def test_databricks_sdk_manages_an_endpoint_at_run_time(cp, w, http):
    created = _everywhere(lambda: w.serving_endpoints.create(
        name="sdk-ep", description="made by the SDK",
        config=serving.EndpointCoreConfigInput(
            name="sdk-ep", served_entities=[serving.ServedEntityInput(entity_name="emb-a")]),
        tags=[serving.EndpointTag(key="team", value="search")],
    ).result())
    assert created.name == "sdk-ep" and created.state.ready == serving.EndpointStateReady.READY
    assert created.state.config_update == serving.EndpointStateConfigUpdate.NOT_UPDATING
    got = w.serving_endpoints.get("sdk-ep")
    assert got.task == "llm/v1/embeddings" and got.description == "made by the SDK"
    assert [t.as_dict() for t in got.tags] == [{"key": "team", "value": "search"}]
    assert _served(http, "sdk-ep", 5) == {"emb-a": 5}

    # A new config: the split moves to emb-b on every gateway replica within the second.
    updated = _everywhere(lambda: w.serving_endpoints.update_config(
        "sdk-ep",
        served_entities=[serving.ServedEntityInput(entity_name="emb-a", name="a"),
                         serving.ServedEntityInput(entity_name="emb-b", name="b")],
        traffic_config=serving.TrafficConfig(routes=[
            serving.Route(served_model_name="a", traffic_percentage=0),
            serving.Route(served_model_name="b", traffic_percentage=100)]),
    ).result())
    assert updated.config.config_version == 2
    assert _served(http, "sdk-ep", 40) == {"emb-b": 40}

    # A rate limit set through put_ai_gateway binds within a second on both gateway replicas
    # and both quota replicas: a burst that starts one second after the write began gets
    # exactly `calls` requests through, and each gateway refuses some of it (its own counter).
    # (AdmitMany and SettleMany alternate on a gateway's round-robin channel: count every
    # quota call.)
    quota_calls = {"grpc_service": "fmapi.quota.v1.QuotaService"}
    before_q = {q: cp.metric(q, "fmapi_grpc_server_started_total", **quota_calls) for q in QUOTAS}
    t0 = time.monotonic()
    put = w.serving_endpoints.put_ai_gateway("sdk-ep", rate_limits=[serving.AiGatewayRateLimit(
        key=serving.AiGatewayRateLimitKey.ENDPOINT, calls=6,
        renewal_period=serving.AiGatewayRateLimitRenewalPeriod.MINUTE)])
    put_s = time.monotonic() - t0
    assert [(r.key.value, r.calls) for r in put.rate_limits] == [("endpoint", 6)]
    assert put_s < PROPAGATION_S, f"put_ai_gateway itself took {put_s:.2f} s"
    time.sleep(max(0.0, t0 + PROPAGATION_S - time.monotonic()))

    def counted() -> dict[tuple[str, str], float]:
        return {(g, st): cp.metric(g, "fmapi_requests_total", endpoint="sdk-ep", status=st)
                for g in GATEWAYS for st in ("200", "429")}

    before = counted()
    burst_at = time.monotonic() - t0
    statuses = Counter(_embed(http, "sdk-ep").status_code for _ in range(20))
    assert statuses == {200: 6, 429: 14}, (statuses, f"burst began {burst_at:.2f} s after the put")

    def deltas():
        d = {k: v - before[k] for k, v in counted().items()}
        return d if sum(d.values()) == 20 else None

    d = _eventually(deltas, timeout=3.0)
    assert d, counted()
    assert d[("gateway", "200")] + d[("gateway-2", "200")] == 6, d
    for g in GATEWAYS:  # the limit binds on this gateway replica too
        assert d[(g, "429")] > 0, (g, d, f"burst began {burst_at:.2f} s after the put")
    for q in QUOTAS:  # both quota replicas took part
        assert cp.metric(q, "fmapi_grpc_server_started_total", **quota_calls) > before_q[q], q
    assert w.serving_endpoints.get("sdk-ep").ai_gateway.rate_limits[0].calls == 6

    # What put_ai_gateway writes, get reads back: a default for users only, and an override
    # given as a service principal's, keep their keys.
    minute = serving.AiGatewayRateLimitRenewalPeriod.MINUTE
    written = [serving.AiGatewayRateLimit(key=serving.AiGatewayRateLimitKey.USER, calls=900,
                                          renewal_period=minute),
               serving.AiGatewayRateLimit(key=serving.AiGatewayRateLimitKey.SERVICE_PRINCIPAL,
                                          principal="app-7", calls=800, renewal_period=minute)]
    w.serving_endpoints.put_ai_gateway("sdk-ep", rate_limits=written)
    read = w.serving_endpoints.get("sdk-ep").ai_gateway.rate_limits
    assert [(r.key.value, r.principal, r.calls) for r in read] == [
        ("user", None, 900), ("service_principal", "app-7", 800)]

    _everywhere(lambda: w.serving_endpoints.delete("sdk-ep"))
    with pytest.raises(NotFound):
        w.serving_endpoints.get("sdk-ep")
    r = _embed(http, "sdk-ep")
    assert r.status_code == 404 and "sdk-ep" in r.json()["message"]


def test_a_traffic_split_changed_at_run_time_moves_traffic(cp, w, http):
    """300 requests at 70/30, then 200 at 100/0, each attributed to the gateway replica that
    served it: the split holds, and then moves, on every replica."""
    config = serving.EndpointCoreConfigInput(
        name="split",
        served_entities=[serving.ServedEntityInput(entity_name="emb-a", name="a"),
                         serving.ServedEntityInput(entity_name="emb-b", name="b")],
        traffic_config=serving.TrafficConfig(routes=[
            serving.Route(served_model_name="a", traffic_percentage=70),
            serving.Route(served_model_name="b", traffic_percentage=30)]))
    _everywhere(lambda: w.serving_endpoints.create(name="split", config=config).result())
    try:
        per_gateway = _served_per_gateway(cp, http, "split", 300)
        total = sum(per_gateway.values(), Counter())
        assert set(total) == {"emb-a", "emb-b"} and _binomial_ok(total["emb-a"], 300, 0.7), total
        for g, counts in per_gateway.items():
            n = sum(counts.values())
            assert n >= 50, per_gateway  # Envoy spreads requests over both replicas
            assert set(counts) == {"emb-a", "emb-b"}, (g, counts)
            assert _binomial_ok(counts["emb-a"], n, 0.7), (g, counts)

        _everywhere(lambda: w.serving_endpoints.update_config("split", served_entities=[
            serving.ServedEntityInput(entity_name="emb-a", name="a"),
            serving.ServedEntityInput(entity_name="emb-b", name="b")],
            traffic_config=serving.TrafficConfig(routes=[
                serving.Route(served_model_name="a", traffic_percentage=100),
                serving.Route(served_model_name="b", traffic_percentage=0)])).result())
        per_gateway = _served_per_gateway(cp, http, "split", 200)
        for g, counts in per_gateway.items():
            n = sum(counts.values())
            assert n >= 30 and counts == {"emb-a": n}, (g, per_gateway)
    finally:
        w.serving_endpoints.delete("split")


def test_an_endpoint_with_no_live_replica_is_not_ready(cp, http):
    _known_without_replica(cp, "emb-gone")
    r = _everywhere(lambda: http.post("/api/2.0/serving-endpoints", json={
        "name": "gone-only", "config": {"served_entities": [{"entity_name": "emb-gone"}]}}))
    assert r.status_code == 200, r.text
    try:
        assert r.json()["state"] == {"ready": "NOT_READY", "config_update": "NOT_UPDATING"}
        got = http.get("/api/2.0/serving-endpoints/gone-only").json()
        assert got["state"]["ready"] == "NOT_READY", got
        r = _embed(http, "gone-only")
        assert r.status_code == 503 and "no live replica" in r.json()["message"]
    finally:
        assert http.delete("/api/2.0/serving-endpoints/gone-only").status_code == 200


def test_a_fallback_configured_at_run_time_takes_over(cp, w, http):
    # "emb-gone" is a model fmapi knows (a server registered it once) with no replica now.
    _known_without_replica(cp, "emb-gone")
    w.serving_endpoints.create(name="fb", config=serving.EndpointCoreConfigInput(
        name="fb",
        served_entities=[serving.ServedEntityInput(entity_name="emb-gone", name="primary"),
                         serving.ServedEntityInput(entity_name="emb-b", name="spare")],
        traffic_config=serving.TrafficConfig(routes=[
            serving.Route(served_model_name="primary", traffic_percentage=100),
            serving.Route(served_model_name="spare", traffic_percentage=0)])))
    try:
        # The other gateway may not know "fb" yet (a 404) for up to a second.
        r = _eventually(lambda: (x := _embed(http, "fb")).status_code != 404 and x, timeout=3.0)
        assert r, "fb still unknown 3 s after it was created"
        assert r.status_code == 503 and "no live replica" in r.json()["message"]
        _everywhere(lambda: w.serving_endpoints.put_ai_gateway(
            "fb", fallback_config=serving.FallbackConfig(enabled=True)))
        assert _served(http, "fb", 20) == {"emb-b": 20}
        # fmapi's extension: another endpoint as the last resort.
        r = _everywhere(lambda: http.put("/api/2.0/serving-endpoints/fb/ai-gateway", json={
            "fallback_config": {"enabled": False, "endpoints": ["all-minilm-l6-v2"]}}))
        assert r.status_code == 200, r.text
        assert r.json()["fallback_config"] == {"enabled": False, "endpoints": ["all-minilm-l6-v2"]}
        assert _served(http, "fb", 10) == {"all-minilm-l6-v2": 10}
    finally:
        w.serving_endpoints.delete("fb")


def test_an_update_while_another_is_in_progress_is_refused(cp, w, http):
    # A new config whose model has no live replica waits for one (IN_PROGRESS, for up to
    # routing's pending timeout, 10 minutes): meanwhile the old config serves, and a second
    # update is refused.
    _known_without_replica(cp, "emb-gone")
    config = serving.EndpointCoreConfigInput(
        name="busy", served_entities=[serving.ServedEntityInput(entity_name="emb-a")])
    _everywhere(lambda: w.serving_endpoints.create(name="busy", config=config).result())
    try:
        r = _everywhere(lambda: http.put("/api/2.0/serving-endpoints/busy/config", json={
            "served_entities": [{"entity_name": "emb-gone"}]}))
        assert r.status_code == 200, r.text
        assert r.json()["state"]["config_update"] == "IN_PROGRESS"
        r = http.put("/api/2.0/serving-endpoints/busy/config",
                     json={"served_entities": [{"entity_name": "emb-b"}]})
        assert r.status_code == 409, r.text
        err = r.json()
        assert err["error_code"] == "RESOURCE_CONFLICT" and err["error"]["param"] == "config", err
        assert "in progress" in err["message"] and "emb-gone" in err["message"], err
        got = http.get("/api/2.0/serving-endpoints/busy").json()
        assert got["state"]["config_update"] == "IN_PROGRESS", got
        assert got["config"]["config_version"] == 1 and got["pending_config"], got
        assert [e["entity_name"] for e in got["config"]["served_entities"]] == ["emb-a"]
        assert _served(http, "busy", 5) == {"emb-a": 5}
    finally:
        w.serving_endpoints.delete("busy")


@pytest.mark.parametrize("method, path, body, field, words", [
    ("PUT", "all-minilm-l6-v2/config",
     {"served_entities": [{"entity_name": "emb-a", "name": "a"},
                          {"entity_name": "emb-b", "name": "b"}],
      "traffic_config": {"routes": [{"served_model_name": "a", "traffic_percentage": 50},
                                    {"served_model_name": "b", "traffic_percentage": 40}]}},
     "config.traffic_config.routes", "add up to 100"),
    ("PUT", "all-minilm-l6-v2/config", {"served_entities": [{"entity_name": "no-such-model"}]},
     "config.served_entities[0].entity_name", "unknown"),
    ("PUT", "all-minilm-l6-v2/config", {"served_entities": []}, "config.served_entities",
     "at least one"),
    ("PUT", "all-minilm-l6-v2/ai-gateway",
     {"fallback_config": {"enabled": True, "endpoints": ["x-requests", "ghost"]}},
     "ai_gateway.fallback_config.endpoints[1]", "unknown endpoint 'ghost'"),
    ("PUT", "all-minilm-l6-v2/ai-gateway",
     {"rate_limits": [{"key": "user_group", "calls": 1, "renewal_period": "minute"}]},
     "ai_gateway.rate_limits[0].key", "user groups"),
    ("PUT", "all-minilm-l6-v2/ai-gateway",
     {"rate_limits": [{"key": "endpoint", "calls": 1, "renewal_period": "day"}]},
     "ai_gateway.rate_limits[0].renewal_period", "minute"),
    ("PUT", "all-minilm-l6-v2/ai-gateway",
     {"rate_limits": [{"key": "user", "calls": -3, "renewal_period": "minute"}]},
     "ai_gateway.rate_limits[0].calls", "whole number"),
    # Retiring without a replacement: through the retire call, and declared in an apply.
    ("POST", "/api/2.0/fmapi/endpoints/all-minilm-l6-v2/retire", {}, "replacement",
     "must name the endpoint"),
    ("POST", "/api/2.0/fmapi/endpoints/apply",
     {"endpoints": [{"name": "retired-alone", "task": "llm/v1/embeddings",
                     "served_entities": [{"model": "emb-a"}], "retired": True}]},
     "endpoints[0].replacement", "must name its replacement"),
])
def test_invalid_updates_are_refused_and_the_old_config_keeps_serving(http, method, path, body,
                                                                      field, words):
    url = path if path.startswith("/") else f"/api/2.0/serving-endpoints/{path}"
    r = http.request(method, url, json=body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert words in err["message"] and err["error"]["param"] == field, err
    assert _served(http, "all-minilm-l6-v2", 3) == {"all-minilm-l6-v2": 3}
    ep = http.get("/api/2.0/serving-endpoints/all-minilm-l6-v2").json()
    assert ep["config"]["config_version"] == 1 and ep["ai_gateway"]["rate_limits"] == []
    assert ep["ai_gateway"]["fallback_config"] == {"enabled": False} and not ep.get("retired")
    assert http.get("/api/2.0/serving-endpoints/retired-alone").status_code == 404


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
    assert _everywhere(lambda: main(["endpoints", "limits", "set", "cli-ep", "--key", "endpoint",
                                     "--calls", "3", *common])) == 0
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
    config = serving.EndpointCoreConfigInput(
        name="old-embed", served_entities=[serving.ServedEntityInput(entity_name="emb-a")])
    _everywhere(lambda: w.serving_endpoints.create(name="old-embed", config=config).result())
    try:
        assert _embed(http, "old-embed").status_code == 200
        r = http.post("/api/2.0/fmapi/endpoints/old-embed/retire", json={"replacement": "ghost"})
        assert r.status_code == 400 and "ghost" in r.json()["message"]
        assert r.json()["error"]["param"] == "replacement"
        r = _everywhere(lambda: http.post("/api/2.0/fmapi/endpoints/old-embed/retire",
                                          json={"replacement": "all-minilm-l6-v2"}))
        assert r.status_code == 200 and r.json()["replacement"] == "all-minilm-l6-v2"
        r = _embed(http, "old-embed")
        assert r.status_code == 400 and "use 'all-minilm-l6-v2' instead" in r.json()["message"]
    finally:
        w.serving_endpoints.delete("old-embed")
