"""The endpoint registry and the router's choices over a snapshot (no Redis, no gRPC)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fmapi.routing.v1 import routing_pb2 as pb
from fmapi_common.endpoints import Endpoint, Registry, from_pb, load_registry, to_pb
from fmapi_common.errors import FailedPrecondition, NotFound, Unavailable
from fmapi_common.router import Router, View


def ReplicaInfo(id, address, inflight=0, dedicated_endpoint="", models=()):  # noqa: N802
    return pb.Replica(id=id, address=address, inflight=inflight,
                      dedicated_endpoint=dedicated_endpoint, models=list(models))


def registry(*endpoints, static=None) -> Registry:
    return Registry.model_validate({"endpoints": list(endpoints), "static_replicas": static or {}})


def make_router(reg: Registry, table: dict[str, list[pb.Replica]], rng=None) -> Router:
    """A router over a snapshot as routing streams it to gateways."""
    msg = pb.WatchRegistryResponse(version=1, endpoints=[to_pb(e) for e in reg.endpoints])
    for model, replicas in table.items():
        for r in replicas:
            r.models[:] = [model]
            msg.replicas.append(r)
    for model, addrs in reg.static_replicas.items():
        msg.static_replicas[model].addresses.extend(addrs)
    view = View.of(msg)
    return Router(lambda: view, rng=rng)


def ep(name, model=None, **kw):
    return {"name": name, "task": "llm/v1/chat", "served_entities": [{"model": model or name}], **kw}


def test_dev_registry_loads():
    reg = load_registry("infra/endpoints/dev.yaml")
    emb = reg.get("all-minilm-l6-v2")
    assert emb.task == "llm/v1/embeddings" and emb.embedding.normalize


@pytest.mark.parametrize(
    "doc, fragment",
    [
        ({"endpoints": [ep("a"), ep("a")]}, "duplicate"),
        ({"endpoints": [ep("a", fallbacks=["zz"])]}, "unknown endpoint"),
        ({"endpoints": [ep("a", retired=True)]}, "replacement"),
        ({"endpoints": [{"name": "a", "task": "llm/v1/chat", "served_entities": []}]}, "served_entities"),
        ({"endpoints": [{"name": "a", "task": "translate", "served_entities": [{"model": "m"}]}]}, "task"),
        ({"endpoints": [ep("a", colour="red")]}, "colour"),
        ({"endpoints": [{"name": "a", "task": "llm/v1/chat", "served_entities": [
            {"model": "m1", "traffic_percentage": 60}, {"model": "m2", "traffic_percentage": 60}]}]}, "100"),
        ({"endpoints": [ep("a", limits={"principals": [
            {"principal": "bob", "limits": {}}, {"principal": "bob", "limits": {}}]})]}, "twice"),
        ({"endpoints": [ep("a", limits={"endpoint": {"requests_per_minute": -1}})]}, "requests_per_minute"),
    ],
)
def test_bad_registry_is_refused_with_a_reason(tmp_path, doc, fragment):
    import yaml

    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError) as exc:
        load_registry(path)
    assert fragment in str(exc.value)


def test_unknown_endpoint_is_not_found():
    router = make_router(registry(ep("a")), {})
    with pytest.raises(NotFound) as exc:
        router.resolve("b")
    assert "'b'" in exc.value.message and exc.value.param == "model"


def test_nothing_resolves_before_the_registry_is_loaded():
    router = Router(lambda: View())
    with pytest.raises(Unavailable) as exc:
        router.resolve("a")
    assert "not loaded" in exc.value.message and exc.value.retry_after


def test_retired_endpoint_names_its_replacement():
    router = make_router(registry(ep("old", retired=True, replacement="new"), ep("new")),
                         {"new": [ReplicaInfo("r", "h:1")]})
    with pytest.raises(FailedPrecondition) as exc:
        router.resolve("old")
    assert "'new'" in exc.value.message


def test_fallback_serves_when_the_endpoint_has_no_replica():
    router = make_router(registry(ep("a", fallbacks=["b"]), ep("b")),
                         {"b": [ReplicaInfo("r", "h:2")]})
    res = router.resolve("a")
    assert res.endpoint.name == "b" and res.replica.address == "h:2"


def test_no_replica_anywhere_is_unavailable_with_retry():
    router = make_router(registry(ep("a")), {})
    with pytest.raises(Unavailable) as exc:
        router.resolve("a")
    assert exc.value.retry_after


def test_static_replicas_count_as_live():
    router = make_router(registry(ep("a"), static={"a": ["h:9"]}), {})
    assert router.resolve("a").replica.address == "h:9"


SPLIT = {"name": "a", "task": "llm/v1/chat", "served_entities": [
    {"model": "m1", "traffic_percentage": 80}, {"model": "m2", "traffic_percentage": 20}]}


def test_traffic_split_follows_percentages():
    table = {"m1": [ReplicaInfo("1", "h:1")], "m2": [ReplicaInfo("2", "h:2")]}
    router = make_router(registry(SPLIT), table, rng=random.Random(7))
    counts = Counter([router.resolve("a").model for _ in range(2000)])
    assert 0.75 < counts["m1"] / 2000 < 0.85


def test_without_fallback_a_split_to_a_dead_model_fails_that_share():
    router = make_router(registry(SPLIT), {"m1": [ReplicaInfo("1", "h:1")]}, rng=random.Random(5))
    outcomes = Counter()
    for _ in range(500):
        try:
            outcomes[router.resolve("a").model] += 1
        except Unavailable:
            outcomes["unavailable"] += 1
    assert outcomes["m1"] > 300 and outcomes["unavailable"] > 50


def test_fallback_config_moves_a_dead_entity_s_share_to_the_others():
    doc = {**SPLIT, "ai_gateway": {"fallback_enabled": True}}
    router = make_router(registry(doc), {"m1": [ReplicaInfo("1", "h:1")]}, rng=random.Random(5))
    assert {router.resolve("a").model for _ in range(500)} == {"m1"}


def test_least_loaded_of_two_is_preferred():
    table = {"a": [ReplicaInfo("busy", "h:1", inflight=50), ReplicaInfo("idle", "h:2", inflight=0)]}
    router = make_router(registry(ep("a")), table, rng=random.Random(1))
    picks = Counter([router.resolve("a").replica.id for _ in range(50)])
    assert picks == {"idle": 50}


def test_provisioned_endpoint_uses_its_dedicated_replicas_and_ppt_never_does():
    pt = ep("pt", model="m", capacity_mode="provisioned_throughput",
            provisioned_throughput={"min_tokens_per_second": 100, "max_tokens_per_second": 200,
                                    "chunk_tokens_per_second": 100})
    table = {"m": [ReplicaInfo("shared", "h:1"), ReplicaInfo("mine", "h:2", dedicated_endpoint="pt")]}
    router = make_router(registry(pt, ep("ppt", model="m")), table, rng=random.Random(3))
    assert {router.resolve("pt").replica.id for _ in range(20)} == {"mine"}
    assert {router.resolve("ppt").replica.id for _ in range(20)} == {"shared"}


def test_every_endpoint_field_survives_the_proto_round_trip():
    doc = {**ep("a", model="m"), "description": "d", "tags": {"team": "x", "n": "42"},
           "limits": {"requests_per_minute": 5, "tokens_per_minute": 900,
                      "endpoint": {"input_tokens_per_minute": 7},
                      "principals": [{"principal": "123", "limits": {"requests_per_minute": 1}}]},
           "ai_gateway": {"usage_tracking_enabled": True, "fallback_enabled": True,
                          "inference_table": {"enabled": True, "catalog_name": "c"}},
           "config_version": 3, "config_update": "IN_PROGRESS",
           "pending_served_entities": [{"model": "m2"}], "create_time_ms": 2**40}
    e = Endpoint.model_validate(doc)
    assert from_pb(to_pb(e)) == e
    # Digit-only strings stay strings (tags, principals).
    assert from_pb(to_pb(e)).tags["n"] == "42"
