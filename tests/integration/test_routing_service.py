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
from helpers import tls
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


_REDIS: list[RedisServer] = []  # the module's Redis (the last test freezes it)


def routing_fixture_redis() -> RedisServer:
    return _REDIS[-1]


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
            **tls.env("FMAPI_ROUTING_", "routing"),
        },
    )
    port = sup.wait_for_file(child, tmp / "port", 30)
    _REDIS.append(redis)
    yield f"127.0.0.1:{port}"
    sup.stop()
    redis.stop()


@pytest.fixture
async def stub(routing):
    """Routing as the gateway sees it."""
    async with tls.aio_channel(routing, "gateway", "routing") as ch:
        yield routing_pb2_grpc.RoutingServiceStub(ch)


@pytest.fixture
async def model_server(routing):
    """Routing as a generation server sees it (the identity that registers replicas)."""
    async with tls.aio_channel(routing, "generation", "routing") as ch:
        yield routing_pb2_grpc.RoutingServiceStub(ch)


def _replica(address: str, kind=pb.REPLICA_KIND_GENERATION, **kw) -> pb.Replica:
    return pb.Replica(address=address, models=["m1"], kind=kind, **kw)


async def test_registered_replica_serves_until_it_deregisters(stub, model_server):
    reg = await model_server.RegisterReplica(
        pb.RegisterReplicaRequest(replica=_replica("10.0.0.1:1"), ttl_seconds=30))
    res = await stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="chat"))
    assert res.replica.address == "10.0.0.1:1" and res.model == "m1"
    listed = await stub.ListReplicas(pb.ListReplicasRequest(model="m1"))
    assert [r.id for r in listed.replicas] == [reg.id]
    await model_server.DeregisterReplica(pb.DeregisterReplicaRequest(id=reg.id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="chat"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_replica_that_stops_heartbeating_drops_out(stub, model_server):
    reg = await model_server.RegisterReplica(
        pb.RegisterReplicaRequest(replica=_replica("10.0.0.2:1"), ttl_seconds=2))
    assert (await model_server.Heartbeat(pb.HeartbeatRequest(id=reg.id, inflight=3))).known
    listed = await stub.ListReplicas(pb.ListReplicasRequest(model="m1"))
    assert [r.inflight for r in listed.replicas] == [3]
    await asyncio.sleep(2.3)
    assert not (await model_server.Heartbeat(pb.HeartbeatRequest(id=reg.id))).known
    assert not (await stub.ListReplicas(pb.ListReplicasRequest(model="m1"))).replicas


async def test_errors_carry_clear_messages(stub, model_server):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="old"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'chat'" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await model_server.RegisterReplica(pb.RegisterReplicaRequest(replica=pb.Replica(address="")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_without_reflection(routing):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with tls.aio_channel(routing, "embedding", "routing") as ch:
        h = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="fmapi.routing.v1.RoutingService"))
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        # Reflection is off unless configured: nothing lists the internal methods.
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---------------------------------------------------------------- attacks (issue: zero trust)


async def test_attack_without_a_client_certificate_the_connection_fails(routing):
    async with grpc.aio.insecure_channel(routing) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await routing_pb2_grpc.RoutingServiceStub(ch).RegisterReplica(
                pb.RegisterReplicaRequest(replica=_replica("10.6.6.6:1")), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with open(tls.files("gateway").ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(f.read())
    async with grpc.aio.secure_channel(
        routing, creds, options=[("grpc.ssl_target_name_override", "routing")]
    ) as ch:  # TLS, but no certificate of our own
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await routing_pb2_grpc.RoutingServiceStub(ch).ListReplicas(
                pb.ListReplicasRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_attack_only_model_servers_register_replicas(routing, stub):
    for identity in ("gateway", "envoy", "auth"):
        async with tls.aio_channel(routing, identity, "routing") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await routing_pb2_grpc.RoutingServiceStub(ch).RegisterReplica(
                    pb.RegisterReplicaRequest(replica=_replica("10.6.6.6:1", inflight=-100)))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, identity
        assert f"{identity} may not call" in err.value.details()
    assert not (await stub.ListReplicas(pb.ListReplicasRequest(model="m1"))).replicas


async def test_attack_model_servers_cannot_resolve_or_list(routing):
    async with tls.aio_channel(routing, "embedding", "routing") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await routing_pb2_grpc.RoutingServiceStub(ch).ResolveEndpoint(
                pb.ResolveEndpointRequest(name="chat"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_attack_a_registration_belongs_to_its_identity(routing, stub, model_server):
    reg = await model_server.RegisterReplica(
        pb.RegisterReplicaRequest(replica=_replica("10.0.0.3:1"), ttl_seconds=30))
    try:
        async with tls.aio_channel(routing, "embedding", "routing") as ch:
            other = routing_pb2_grpc.RoutingServiceStub(ch)
            for call in (other.Heartbeat(pb.HeartbeatRequest(id=reg.id, inflight=0)),
                         other.DeregisterReplica(pb.DeregisterReplicaRequest(id=reg.id))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # Nor can anyone re-register an existing id to move it to another address.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await other.RegisterReplica(pb.RegisterReplicaRequest(
                    replica=_replica("10.6.6.6:1", kind=pb.REPLICA_KIND_EMBEDDING, id=reg.id)))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # An embedding server cannot pose as a generation replica either.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await other.RegisterReplica(pb.RegisterReplicaRequest(replica=_replica("10.6.6.6:1")))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        listed = await stub.ListReplicas(pb.ListReplicasRequest(model="m1"))
        assert [(r.id, r.address) for r in listed.replicas] == [(reg.id, "10.0.0.3:1")]
    finally:
        await model_server.DeregisterReplica(pb.DeregisterReplicaRequest(id=reg.id))


@pytest.mark.parametrize("request_kw, field", [
    ({"ttl_seconds": 86400}, "ttl_seconds"),
    ({"ttl_seconds": 1}, "ttl_seconds"),
    ({"ttl_seconds": -5}, "ttl_seconds"),
    ({"replica": _replica("10.0.0.4:1", inflight=-100)}, "inflight"),
    ({"replica": _replica("not an address")}, "address"),
    ({"replica": pb.Replica(address="10.0.0.4:1", models=["x" * 500])}, "models"),
])
async def test_attack_registration_values_are_bounded(model_server, stub, request_kw, field):
    req = pb.RegisterReplicaRequest(**{"replica": _replica("10.0.0.4:1"), **request_kw})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await model_server.RegisterReplica(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    reg = await model_server.RegisterReplica(
        pb.RegisterReplicaRequest(replica=_replica("10.0.0.4:1"), ttl_seconds=5))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await model_server.Heartbeat(pb.HeartbeatRequest(id=reg.id, inflight=-100))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await model_server.DeregisterReplica(pb.DeregisterReplicaRequest(id=reg.id))


def test_sigterm_stops_gracefully(tmp_path):
    redis = RedisServer(tmp_path).start()
    (tmp_path / "e.yaml").write_text(ENDPOINTS)
    sup = Supervisor(tmp_path / "logs")
    child = sup.start("routing", [sys.executable, "-m", "fmapi_routing",
                                  "--endpoints-file", str(tmp_path / "e.yaml"),
                                  "--redis-url", redis.url, "--port-file", str(tmp_path / "p")],
                      tls.env("FMAPI_ROUTING_", "routing"))
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


async def test_zz_redis_unreachable_is_a_prompt_unavailable(routing, stub):
    """Frozen Redis: the gateway hears UNAVAILABLE with a retry delay within a second or two,
    never INTERNAL and never a hang."""
    import os
    import signal

    from fmapi_common.errors import Unavailable, from_rpc_error

    proc = routing_fixture_redis().proc
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="chat"), timeout=10)
        took = time.monotonic() - t0
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    e = from_rpc_error(err.value)
    assert isinstance(e, Unavailable) and e.retry_after == 1.0 and "Redis" in e.message
    assert took < 3, took
