"""GET /healthz needs no token: what it tells anyone, and what a flood of it costs the backends."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from fmapi.routing.v1 import routing_pb2 as pb
from fmapi_common.router import View
from fmapi_gateway.backends import Backends
from fmapi_gateway.config import GatewayConfig
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.gateway_app import KEY, app_client


class _CountingHealth(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self.checks = 0

    async def Check(self, request, context):  # noqa: N802 - gRPC method name
        self.checks += 1
        await asyncio.sleep(0.05)  # a backend that takes a moment: callers arrive meanwhile
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class _Recorded(Backends):
    """Backends that let the test reach the instance app_client builds."""

    made: list[Backends] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _Recorded.made.append(self)


@pytest.fixture
async def backend():
    """One health service standing in for routing and for two model-server replicas."""
    health = _CountingHealth()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", health
    finally:
        await server.stop(None)


async def test_healthz_names_no_address_and_a_flood_checks_each_backend_once(backend):
    address, health = backend
    config = GatewayConfig(routing_addr=address, auth_addr="127.0.0.1:1",
                           quota_addr="127.0.0.1:1", identity_key=KEY, insecure=True)
    _Recorded.made.clear()
    async with app_client(config, _Recorded) as client:
        (backends,) = _Recorded.made
        backends.registry.view = View.of(pb.WatchRegistryResponse(version=1, replicas=[
            pb.Replica(id="a" * 32, address=address, kind=pb.REPLICA_KIND_GENERATION,
                       models=["m"]),
            pb.Replica(id="b" * 32, address=address, kind=pb.REPLICA_KIND_EMBEDDING,
                       models=["e"]),
        ]))
        answers = await asyncio.gather(*(client.get("/healthz") for _ in range(50)))
        assert {r.status_code for r in answers} == {200}
        body = answers[0].json()
        assert body["status"] == "ok"
        assert body["services"] == {"routing": "SERVING", "generation 1": "SERVING",
                                    "embedding 1": "SERVING", "gateway": "SERVING"}
        for r in answers:  # a public answer: no replica's address, no replica's id
            assert address not in r.text and str(address.rsplit(":", 1)[1]) not in r.text
            assert "a" * 32 not in r.text
        # 50 callers at once: routing and each replica were asked once (not 50 times each).
        assert health.checks == 3
        await asyncio.sleep(1.1)  # after HEALTH_TTL_S, a caller gets a fresh check
        assert (await client.get("/healthz")).status_code == 200
        assert health.checks == 6

