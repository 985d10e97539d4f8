"""RoutingService: proto <-> domain, nothing else."""

from __future__ import annotations

from fmapi.routing.v1 import routing_pb2 as pb
from fmapi.routing.v1 import routing_pb2_grpc
from fmapi_common.errors import InvalidArgument

from .convert import endpoint_to_pb, replica_from_pb, replica_to_pb
from .replicas import ReplicaStore
from .router import Router


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
        r = request.replica
        if not r.address or not r.models:
            raise InvalidArgument("a replica needs an address and at least one model", param="replica")
        ttl = request.ttl_seconds or 10
        rid = await self._store.register(replica_from_pb(r), ttl)
        return pb.RegisterReplicaResponse(id=rid)

    async def Heartbeat(self, request, context):
        return pb.HeartbeatResponse(known=await self._store.heartbeat(request.id, request.inflight))

    async def DeregisterReplica(self, request, context):
        await self._store.deregister(request.id)
        return pb.DeregisterReplicaResponse()

    async def ListReplicas(self, request, context):
        if request.model:
            replicas = await self._store.live_for_model(request.model)
        else:
            replicas = await self._store.all_live()
        return pb.ListReplicasResponse(replicas=[replica_to_pb(r) for r in replicas])
