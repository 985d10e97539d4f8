"""The routing service over gRPC with a real Redis: replicas register, heartbeat, expire, leave."""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
import pytest

from fmapi.routing.v1 import routing_pb2 as pb
from fmapi.routing.v1 import routing_pb2_grpc
from fmapi_cli.supervisor import Supervisor
from helpers.redis_server import RedisServer

ENDPOINTS = """
endpoints:
  - name: chat
    task: llm/v1/chat
    served_entities: [{model: m1}]
  - name: old
    task: llm/v1/chat
    served_entities: [{model: m1}]
    retired: true
    replacement: chat
"""


@pytest.fixture(scope="module")
def routing(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    redis = RedisServer(tmp).start()
    (tmp / "endpoints.yaml").write_text(ENDPOINTS)
    sup = Supervisor(tmp / "logs")
    child = sup.start(
        "routing",
        [sys.executable, "-m", "fmapi_routing"],
        {
            "FMAPI_ROUTING_ENDPOINTS_FILE": str(tmp / "endpoints.yaml"),
            "FMAPI_ROUTING_REDIS_URL": redis.url,
            "FMAPI_ROUTING_PORT_FILE": str(tmp / "port"),
        },
    )
    port = sup.wait_for_file(child, tmp / "port", 30)
    yield f"127.0.0.1:{port}"
    sup.stop()
    redis.stop()


@pytest.fixture
async def stub(routing):
    async with grpc.aio.insecure_channel(routing) as ch:
        yield routing_pb2_grpc.RoutingServiceStub(ch)


async def test_registered_replica_serves_until_it_deregisters(stub):
    reg = await stub.RegisterReplica(pb.RegisterReplicaRequest(
        replica=pb.Replica(address="10.0.0.1:1", models=["m1"], kind=pb.REPLICA_KIND_GENERATION),
        ttl_seconds=30))
    res = await stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="chat"))
    assert res.replica.address == "10.0.0.1:1" and res.model == "m1"
    listed = await stub.ListReplicas(pb.ListReplicasRequest(model="m1"))
    assert [r.id for r in listed.replicas] == [reg.id]
    await stub.DeregisterReplica(pb.DeregisterReplicaRequest(id=reg.id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="chat"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_replica_that_stops_heartbeating_drops_out(stub):
    reg = await stub.RegisterReplica(pb.RegisterReplicaRequest(
        replica=pb.Replica(address="10.0.0.2:1", models=["m1"]), ttl_seconds=1))
    assert (await stub.Heartbeat(pb.HeartbeatRequest(id=reg.id, inflight=3))).known
    listed = await stub.ListReplicas(pb.ListReplicasRequest(model="m1"))
    assert [r.inflight for r in listed.replicas] == [3]
    await asyncio.sleep(1.3)
    assert not (await stub.Heartbeat(pb.HeartbeatRequest(id=reg.id))).known
    assert not (await stub.ListReplicas(pb.ListReplicasRequest(model="m1"))).replicas


async def test_errors_carry_clear_messages(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="old"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'chat'" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RegisterReplica(pb.RegisterReplicaRequest(replica=pb.Replica(address="")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_and_reflection(routing):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(routing) as ch:
        h = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="fmapi.routing.v1.RoutingService"))
        assert h.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_stops_gracefully(tmp_path):
    redis = RedisServer(tmp_path).start()
    (tmp_path / "e.yaml").write_text(ENDPOINTS)
    sup = Supervisor(tmp_path / "logs")
    child = sup.start("routing", [sys.executable, "-m", "fmapi_routing",
                                  "--endpoints-file", str(tmp_path / "e.yaml"),
                                  "--redis-url", redis.url, "--port-file", str(tmp_path / "p")])
    sup.wait_for_file(child, tmp_path / "p", 30)
    t0 = time.monotonic()
    child.proc.terminate()
    assert child.proc.wait(15) == 0
    assert time.monotonic() - t0 < 10
    assert "shutting down" in child.tail()
    sup.stop()
    redis.stop()


def test_missing_config_stops_start_up_with_a_clear_message(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "fmapi_routing"], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0
    assert "FMAPI_ROUTING_ENDPOINTS_FILE" in out.stderr and "FMAPI_ROUTING_REDIS_URL" in out.stderr
