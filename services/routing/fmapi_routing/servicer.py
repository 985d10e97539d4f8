"""RoutingService: proto <-> domain, nothing else."""

from __future__ import annotations

from fmapi.routing.v1 import routing_pb2 as pb
from fmapi.routing.v1 import routing_pb2_grpc
from fmapi_common.endpoints import Endpoint, to_pb
from fmapi_common.errors import PermissionDenied
from fmapi_common.router import Router, no_such_endpoint
from fmapi_common.tls import EMBEDDING, GENERATION, peer_identity

from .convert import replica_from_pb, replica_to_pb
from .registry import ControlPlane
from .replicas import DEFAULT_TTL, ReplicaStore, check_registration
from .view import RegistryView

# The replica kind each model-server identity may register.
_KIND_OF = {GENERATION: pb.REPLICA_KIND_GENERATION, EMBEDDING: pb.REPLICA_KIND_EMBEDDING}
# A watcher gets the current snapshot at least this often (a keep-alive for idle registries).
WATCH_KEEPALIVE_S = 5.0


def _owner(context) -> str:
    """The registering service's identity ("" without TLS, the benchmarks' insecure mode)."""
    return peer_identity(context) or ""


class RoutingServicer(routing_pb2_grpc.RoutingServiceServicer):
    def __init__(self, view: RegistryView, control: ControlPlane, store: ReplicaStore) -> None:
        self._view = view
        self._control = control
        self._router = Router(lambda: view.current)
        self._store = store

    async def GetEndpoint(self, request, context):
        # From Redis, not this replica's view: a control-plane read right after a write made
        # through another replica (the Databricks SDK's update_config().result()) must see it;
        # the view catches up only after the change message and a rebuild.
        raw = await self._control.store.get(request.name)
        if raw is None:
            raise no_such_endpoint(request.name)
        return pb.GetEndpointResponse(endpoint=to_pb(Endpoint.model_validate_json(raw)))

    async def ListEndpoints(self, request, context):
        return pb.ListEndpointsResponse(endpoints=list(self._view.message.endpoints))

    async def ResolveEndpoint(self, request, context):
        res = self._router.resolve(request.name)
        return pb.ResolveEndpointResponse(endpoint=res.endpoint, model=res.model, replica=res.replica)

    async def WatchRegistry(self, request, context):
        seq = -1
        while not self._view.closing:
            await self._view.wait_newer(seq, WATCH_KEEPALIVE_S)
            if self._view.closing:
                return
            seq = self._view.seq
            if self._view.message.version >= 0:
                yield self._view.message

    async def CreateEndpoint(self, request, context):
        ep, version = await self._control.create(request.endpoint)
        self._view.poke()
        return pb.CreateEndpointResponse(endpoint=to_pb(ep), version=version)

    async def UpdateEndpoint(self, request, context):
        ep, version = await self._control.update(request.endpoint, request.update_mask)
        self._view.poke()
        return pb.UpdateEndpointResponse(endpoint=to_pb(ep), version=version)

    async def DeleteEndpoint(self, request, context):
        version = await self._control.delete(request.name)
        self._view.poke()
        return pb.DeleteEndpointResponse(version=version)

    async def ApplyEndpoints(self, request, context):
        out = await self._control.apply(list(request.endpoints), request.prune)
        self._view.poke()
        return out

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
