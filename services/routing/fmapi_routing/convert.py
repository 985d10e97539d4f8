"""Endpoint and replica domain objects <-> routing protos."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from fmapi.routing.v1 import routing_pb2 as pb

from .endpoints import Endpoint
from .replicas import ReplicaInfo

TASKS = {
    "llm/v1/chat": pb.TASK_CHAT,
    "llm/v1/completions": pb.TASK_COMPLETIONS,
    "llm/v1/embeddings": pb.TASK_EMBEDDINGS,
}
MODES = {
    "pay_per_token": pb.CAPACITY_MODE_PAY_PER_TOKEN,
    "provisioned_throughput": pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT,
}


def endpoint_to_pb(ep: Endpoint) -> pb.Endpoint:
    out = pb.Endpoint(
        name=ep.name,
        task=TASKS[ep.task],
        capacity_mode=MODES[ep.capacity_mode],
        limits=pb.Limits(**ep.limits.model_dump()),
        fallbacks=ep.fallbacks,
        retired=ep.retired,
        replacement=ep.replacement,
        description=ep.description,
    )
    for se in ep.served_entities:
        out.served_entities.add(
            name=se.name, model=se.model, traffic_percentage=se.traffic_percentage
        )
    if ep.provisioned_throughput:
        out.provisioned_throughput.CopyFrom(
            pb.ProvisionedThroughput(**ep.provisioned_throughput.model_dump())
        )
    if ep.embedding:
        out.embedding.CopyFrom(pb.EmbeddingSettings(**ep.embedding.model_dump()))
    if ep.generation:
        out.generation.CopyFrom(pb.GenerationSettings(**ep.generation.model_dump()))
    return out


def replica_to_pb(r: ReplicaInfo) -> pb.Replica:
    out = pb.Replica(
        id=r.id,
        address=r.address,
        kind=r.kind,
        models=r.models,
        inflight=r.inflight,
        dedicated_endpoint=r.dedicated_endpoint,
    )
    if r.last_seen:
        out.last_seen.CopyFrom(timestamp_pb2.Timestamp(seconds=int(r.last_seen)))
    return out


def replica_from_pb(r: pb.Replica) -> ReplicaInfo:
    return ReplicaInfo(
        id=r.id,
        address=r.address,
        kind=r.kind,
        models=list(r.models),
        inflight=r.inflight,
        dedicated_endpoint=r.dedicated_endpoint,
    )
