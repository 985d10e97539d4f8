"""The endpoint registry and the router's choices (no Redis: the lookup is a function)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fmapi_common.errors import FailedPrecondition, NotFound, Unavailable
from fmapi_routing.endpoints import Registry, load_registry
from fmapi_routing.replicas import ReplicaInfo
from fmapi_routing.router import Router


def registry(*endpoints, static=None) -> Registry:
    return Registry.model_validate({"endpoints": list(endpoints), "static_replicas": static or {}})


def ep(name, model=None, **kw):
    return {"name": name, "task": "llm/v1/chat", "served_entities": [{"model": model or name}], **kw}


def lookup_from(table: dict[str, list[ReplicaInfo]]):
    async def lookup(model: str):
        return list(table.get(model, []))

    return lookup


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


async def test_unknown_endpoint_is_not_found():
    router = Router(registry(ep("a")), lookup_from({}))
    with pytest.raises(NotFound) as exc:
        await router.resolve("b")
    assert "'b'" in exc.value.message and exc.value.param == "model"


async def test_retired_endpoint_names_its_replacement():
    router = Router(registry(ep("old", retired=True, replacement="new"), ep("new")),
                    lookup_from({"new": [ReplicaInfo("r", "h:1")]}))
    with pytest.raises(FailedPrecondition) as exc:
        await router.resolve("old")
    assert "'new'" in exc.value.message


async def test_fallback_serves_when_the_endpoint_has_no_replica():
    router = Router(registry(ep("a", fallbacks=["b"]), ep("b")),
                    lookup_from({"b": [ReplicaInfo("r", "h:2")]}))
    res = await router.resolve("a")
    assert res.endpoint.name == "b" and res.replica.address == "h:2"


async def test_no_replica_anywhere_is_unavailable_with_retry():
    router = Router(registry(ep("a")), lookup_from({}))
    with pytest.raises(Unavailable) as exc:
        await router.resolve("a")
    assert exc.value.retry_after


async def test_static_replicas_count_as_live():
    router = Router(registry(ep("a"), static={"a": ["h:9"]}), lookup_from({}))
    assert (await router.resolve("a")).replica.address == "h:9"


async def test_traffic_split_follows_percentages():
    doc = {"name": "a", "task": "llm/v1/chat", "served_entities": [
        {"model": "m1", "traffic_percentage": 80}, {"model": "m2", "traffic_percentage": 20}]}
    table = {"m1": [ReplicaInfo("1", "h:1")], "m2": [ReplicaInfo("2", "h:2")]}
    router = Router(registry(doc), lookup_from(table), rng=random.Random(7))
    counts = Counter([(await router.resolve("a")).model for _ in range(2000)])
    assert 0.75 < counts["m1"] / 2000 < 0.85


async def test_least_loaded_of_two_is_preferred():
    table = {"a": [ReplicaInfo("busy", "h:1", inflight=50), ReplicaInfo("idle", "h:2", inflight=0)]}
    router = Router(registry(ep("a")), lookup_from(table), rng=random.Random(1))
    picks = Counter([(await router.resolve("a")).replica.id for _ in range(50)])
    assert picks == {"idle": 50}


async def test_provisioned_endpoint_uses_its_dedicated_replicas_and_ppt_never_does():
    pt = ep("pt", model="m", capacity_mode="provisioned_throughput",
            provisioned_throughput={"min_tokens_per_second": 100, "max_tokens_per_second": 200,
                                    "chunk_tokens_per_second": 100})
    table = {"m": [ReplicaInfo("shared", "h:1"), ReplicaInfo("mine", "h:2", dedicated_endpoint="pt")]}
    router = Router(registry(pt, ep("ppt", model="m")), lookup_from(table), rng=random.Random(3))
    assert {(await router.resolve("pt")).replica.id for _ in range(20)} == {"mine"}
    assert {(await router.resolve("ppt")).replica.id for _ in range(20)} == {"shared"}
