"""RoutingService: proto <-> domain, nothing else."""

from __future__ import annotations

from fmapi.routing.v1 import routing_pb2 as pb
from fmapi.routing.v1 import routing_pb2_grpc
from fmapi_common.errors import PermissionDenied
from fmapi_common.tls import GENERATION, EMBEDDING, peer_identity

from .convert import endpoint_to_pb, replica_from_pb, replica_to_pb
from .replicas import DEFAULT_TTL, ReplicaStore, check_registration
from .router import Router


# The replica kind each model-server identity may register.
_KIND_OF = {GENERATION: pb.REPLICA_KIND_GENERATION, EMBEDDING: pb.REPLICA_KIND_EMBEDDING}


def _owner(context) -> str:
    """The registering service's identity ("" without TLS, the benchmarks' insecure mode)."""
    return peer_identity(context) or ""


class RoutingServicer(routing_pb2_grpc.RoutingServiceServicer):
    def __init__(self, router: Router, store: ReplicaStore) -> None:
        self._router = router
        self._store = store

    async def GetEndpoint(self, request, context):
        return pb.GetEndpointResponse(endpoint=endpoint_to_pb(self._router.endpoint(request.name)))

    async def ListEndpoints(self, request, context):
        return pb.ListEndpointsResponse(
            endpoints=[endpoint_to_pb(e) for e in self._router.registry.endpoints]
        )

    async def ResolveEndpoint(self, request, context):
        res = await self._router.resolve(request.name)
        return pb.ResolveEndpointResponse(
            endpoint=endpoint_to_pb(res.endpoint), model=res.model, replica=replica_to_pb(res.replica)
        )

    async def RegisterReplica(self, request, context):
        info = replica_from_pb(request.replica)
        ttl = float(request.ttl_seconds or DEFAULT_TTL)
        check_registration(info, ttl)
        owner = _owner(context)
        if owner and _KIND_OF.get(owner) != info.kind:
            raise PermissionDenied(f"a {owner} server may not register a replica of this kind",
                                   param="replica.kind")
        return pb.RegisterReplicaResponse(id=await self._store.register(info, ttl, owner))

    async def Heartbeat(self, request, context):
        known = await self._store.heartbeat(request.id, request.inflight, _owner(context))
        return pb.HeartbeatResponse(known=known)

    async def DeregisterReplica(self, request, context):
        await self._store.deregister(request.id, _owner(context))
        return pb.DeregisterReplicaResponse()

    async def ListReplicas(self, request, context):
        if request.model:
            replicas = await self._store.live_for_model(request.model)
        else:
            replicas = await self._store.all_live()
        return pb.ListReplicasResponse(replicas=[replica_to_pb(r) for r in replicas])
