"""A change that breaks a reference between endpoints (a fallback to an unknown endpoint, a
retired endpoint without a replacement) is refused naming the field at fault, as the REST
request spells it (routing's control plane over a stand-in store: no Redis)."""

from __future__ import annotations

import pytest
from google.protobuf import field_mask_pb2

from fmapi.routing.v1 import routing_pb2 as pb
from fmapi_common.endpoints import Endpoint
from fmapi_common.errors import FailedPrecondition, InvalidArgument
from fmapi_routing.registry import ControlPlane


class _Store:
    """What ControlPlane asks of the registry store, in memory."""

    def __init__(self, *endpoints: dict) -> None:
        self.raw = {e["name"]: Endpoint.model_validate(e).model_dump_json() for e in endpoints}
        self.version = 1
        self.writes: list = []

    async def snapshot(self):
        return self.version, dict(self.raw)

    async def models(self):
        return {"m": pb.REPLICA_KIND_EMBEDDING}

    async def write(self, changes):
        self.writes.append(changes)
        for name, _, new in changes:
            if new:
                self.raw[name] = new
            else:
                self.raw.pop(name, None)
        self.version += 1
        return self.version


M = pb.ServedEntity(model="m", traffic_percentage=100)


def ep(name: str, **kw) -> dict:
    return {"name": name, "task": "llm/v1/embeddings", "served_entities": [{"model": "m"}], **kw}


def plane(*endpoints: dict) -> tuple[ControlPlane, _Store]:
    store = _Store(*endpoints)
    return ControlPlane(store, lambda: {"m"}), store


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def test_a_fallback_to_an_unknown_endpoint_names_the_fallback_field():
    cp, store = plane(ep("a"), ep("b"))
    with pytest.raises(FailedPrecondition) as err:
        await cp.update(pb.Endpoint(name="a", fallbacks=["b", "ghost"]), _mask("fallbacks"))
    assert err.value.param == "ai_gateway.fallback_config.endpoints[1]"
    assert "'ghost'" in err.value.message and "'a'" in err.value.message
    assert store.writes == []  # the old config stays
    with pytest.raises(FailedPrecondition) as err:
        await cp.create(pb.Endpoint(name="c", task=pb.TASK_EMBEDDINGS, fallbacks=["ghost"],
                                    served_entities=[M]))
    assert err.value.param == "ai_gateway.fallback_config.endpoints[0]"


async def test_retiring_without_a_replacement_or_to_an_unknown_one_names_the_replacement():
    cp, store = plane(ep("a"))
    with pytest.raises(FailedPrecondition) as err:
        await cp.update(pb.Endpoint(name="a", retired=True), _mask("retired", "replacement"))
    assert err.value.param == "replacement" and "must name its replacement" in err.value.message
    with pytest.raises(FailedPrecondition) as err:
        await cp.update(pb.Endpoint(name="a", retired=True, replacement="ghost"),
                        _mask("retired", "replacement"))
    assert err.value.param == "replacement" and "'ghost'" in err.value.message
    assert store.writes == []


async def test_apply_names_the_declared_endpoint_at_fault():
    cp, _ = plane(ep("a"))
    declared = [pb.Endpoint(name="a", task=pb.TASK_EMBEDDINGS,
                            served_entities=[M]),
                pb.Endpoint(name="old", task=pb.TASK_EMBEDDINGS, retired=True,
                            served_entities=[M])]
    with pytest.raises(InvalidArgument) as err:
        await cp.apply(declared, prune=False)
    assert err.value.param == "endpoints[1].replacement"
    declared[0].fallbacks.append("nowhere")
    with pytest.raises(InvalidArgument) as err:
        await cp.apply(declared, prune=False)
    assert err.value.param == "endpoints[0].fallbacks[0]" and "'nowhere'" in err.value.message


async def test_an_endpoint_another_one_needs_cannot_be_deleted():
    cp, store = plane(ep("a"), ep("b", fallbacks=["a"]), ep("c", retired=True, replacement="a"))
    with pytest.raises(FailedPrecondition) as err:
        await cp.delete("a")
    assert err.value.param == "name"
    assert err.value.message == ("endpoint 'a' cannot be deleted: endpoint 'b' falls back to it; "
                                 "endpoint 'c' names it as its replacement; change that first")
    assert store.writes == []
    await cp.delete("b")
    assert "b" not in store.raw
