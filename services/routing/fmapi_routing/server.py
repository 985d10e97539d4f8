"""Wiring: config -> Redis stores, the registry view, gRPC server; the endpoints file applied."""

from __future__ import annotations

import logging

from fmapi.routing.v1 import routing_pb2, routing_pb2_grpc
from fmapi_common.endpoints import load_registry, to_pb
from fmapi_common.errors import FmapiError
from fmapi_common.redis_client import make_redis
from fmapi_common.server import GrpcService, start_grpc_service
from fmapi_common.telemetry import setup_telemetry
from fmapi_common.tls import GATEWAY, MODEL_SERVERS

from .config import RoutingConfig
from .registry import ControlPlane, RegistryStore
from .replicas import ReplicaStore
from .servicer import RoutingServicer
from .view import RegistryView

log = logging.getLogger(__name__)
SERVICE = routing_pb2.DESCRIPTOR.services_by_name["RoutingService"].full_name

# The gateway reads the registry and changes endpoints (for admin callers, whom it checks); only
# model servers register (their own) replicas.
POLICY = {
    f"/{SERVICE}/": [GATEWAY],
    **{f"/{SERVICE}/{m}": MODEL_SERVERS for m in ("RegisterReplica", "Heartbeat", "DeregisterReplica")},
}


async def create(config: RoutingConfig) -> GrpcService:
    setup_telemetry("routing")
    registry = None
    if config.endpoints_file:
        try:
            registry = load_registry(config.endpoints_file)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"routing: {exc}") from None
    client = make_redis(config.redis_url, name="routing", timeout=config.redis_timeout_seconds,
                        max_connections=config.redis_max_connections, decode_responses=False)
    subscriber = make_redis(config.redis_url, name="routing-changes",
                            timeout=config.redis_timeout_seconds, max_connections=2,
                            subscriber=True)
    replicas = ReplicaStore(client)
    store = RegistryStore(client)
    view = RegistryView(store, replicas, subscriber,
                        static_replicas=registry.static_replicas if registry else None,
                        refresh_s=config.refresh_seconds,
                        load_update_s=config.load_update_seconds,
                        pending_timeout_s=config.pending_timeout_seconds)
    control = ControlPlane(store, view.live_models)
    view.control = control
    if registry is not None:
        # The file is the declarative source: make the registry hold what it declares
        # (idempotent, so every routing replica may do it at start).
        try:
            out = await control.apply([to_pb(e) for e in registry.endpoints], prune=False)
        except FmapiError as exc:
            raise SystemExit(f"routing: cannot apply {config.endpoints_file}: {exc.message}") from None
        log.info("applied %s: %d created, %d updated, %d unchanged (registry version %d)",
                 config.endpoints_file, len(out.created), len(out.updated), len(out.unchanged),
                 out.version)
    await view.start()

    def register(server):
        routing_pb2_grpc.add_RoutingServiceServicer_to_server(
            RoutingServicer(view, control, replicas), server)
        return [SERVICE]

    svc = await start_grpc_service(config, register, policy=POLICY)
    svc.on_drain.append(view.drain)
    svc.on_stop.extend([view.stop, client.aclose, subscriber.aclose])
    return svc


async def serve(config: RoutingConfig) -> None:
    svc = await create(config)
    await svc.serve_until_signal()
