"""Replica domain objects <-> routing protos (endpoints: :mod:`fmapi_common.endpoints`)."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from fmapi.routing.v1 import routing_pb2 as pb

from .replicas import ReplicaInfo


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
