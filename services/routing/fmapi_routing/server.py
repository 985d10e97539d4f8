"""Wiring: config -> registry, Redis store, router, gRPC server."""

from __future__ import annotations

from fmapi.routing.v1 import routing_pb2, routing_pb2_grpc
from fmapi_common.redis_client import make_redis
from fmapi_common.server import GrpcService, start_grpc_service
from fmapi_common.telemetry import setup_telemetry
from fmapi_common.tls import GATEWAY, MODEL_SERVERS

from .config import RoutingConfig
from .endpoints import load_registry
from .replicas import ReplicaStore
from .router import Router
from .servicer import RoutingServicer

SERVICE = routing_pb2.DESCRIPTOR.services_by_name["RoutingService"].full_name

# The gateway reads endpoints and replicas; only model servers register (their own) replicas.
POLICY = {
    f"/{SERVICE}/": [GATEWAY],
    **{f"/{SERVICE}/{m}": MODEL_SERVERS for m in ("RegisterReplica", "Heartbeat", "DeregisterReplica")},
}


async def create(config: RoutingConfig) -> GrpcService:
    setup_telemetry("routing")
    try:
        registry = load_registry(config.endpoints_file)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"routing: {exc}") from None
    client = make_redis(config.redis_url, name="routing", timeout=config.redis_timeout_seconds,
                        max_connections=config.redis_max_connections, decode_responses=False)
    store = ReplicaStore(client)
    router = Router(registry, store.live_for_model)

    def register(server):
        routing_pb2_grpc.add_RoutingServiceServicer_to_server(RoutingServicer(router, store), server)
        return [SERVICE]

    svc = await start_grpc_service(config, register, policy=POLICY)
    svc.on_stop.append(client.aclose)
    return svc


async def serve(config: RoutingConfig) -> None:
    svc = await create(config)
    await svc.serve_until_signal()
