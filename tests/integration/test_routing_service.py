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


def start_routing(sup: Supervisor, tmp, redis: RedisServer, name: str = "routing",
                  **env: str) -> str:
    (tmp / "endpoints.yaml").write_text(ENDPOINTS)
    child = sup.start(
        name,
        [sys.executable, "-m", "fmapi_routing"],
        {
            "FMAPI_ROUTING_ENDPOINTS_FILE": str(tmp / "endpoints.yaml"),
            "FMAPI_ROUTING_REDIS_URL": redis.url,
            "FMAPI_ROUTING_PORT_FILE": str(tmp / f"{name}.port"),
            **tls.env("FMAPI_ROUTING_", "routing"),
            **env,
        },
    )
    return f"127.0.0.1:{sup.wait_for_file(child, tmp / f'{name}.port', 30)}"


@pytest.fixture(scope="module")
def routing_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    redis = RedisServer(tmp).start()
    sup = Supervisor(tmp / "logs")
    addr = start_routing(sup, tmp, redis, FMAPI_ROUTING_PENDING_TIMEOUT_SECONDS="3")
    _REDIS.append(redis)
    yield addr, sup, tmp, redis
    sup.stop()
    redis.stop()


@pytest.fixture(scope="module")
def routing(routing_env):
    return routing_env[0]


async def eventually(check, timeout: float = 1.0):
    """``check()`` (a coroutine function) returns truthy within ``timeout`` seconds; its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await check()
            if value:
                return value
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.02)


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
    # Resolution reads routing's view of the registry, rebuilt on the change within a second.
    res = await eventually(lambda: stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="chat")))
    assert res.replica.address == "10.0.0.1:1" and res.model == "m1"
    listed = await stub.ListReplicas(pb.ListReplicasRequest(model="m1"))
    assert [r.id for r in listed.replicas] == [reg.id]
    await model_server.DeregisterReplica(pb.DeregisterReplicaRequest(id=reg.id))

    async def gone():
        try:
            await stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="chat"))
        except grpc.aio.AioRpcError as err:
            return err.code() == grpc.StatusCode.UNAVAILABLE
        return False

    assert await eventually(gone)


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
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    async with tls.aio_channel(routing, "embedding", "routing") as ch:
        h = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="fmapi.routing.v1.RoutingService"))
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        # Reflection is off unless configured: nothing lists the internal methods.
        # The server refuses on the method name alone (its headers): send nothing, so no write
        # races the refusal (a write into a stream the server has just reset reads as INTERNAL).
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo()
        assert await call.code() == grpc.StatusCode.UNIMPLEMENTED


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
    try:
        sup.wait_for_file(child, tmp_path / "p", 30)
        t0 = time.monotonic()
        child.proc.terminate()
        assert child.proc.wait(15) == 0
        assert time.monotonic() - t0 < 10
        assert "shutting down" in child.tail()
    finally:  # a replica that failed to stop must not outlive the test
        sup.stop()
        redis.stop()


def test_missing_config_stops_start_up_with_a_clear_message(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "fmapi_routing"], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0
    assert "FMAPI_ROUTING_REDIS_URL" in out.stderr and "--redis-url" in out.stderr


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
            await stub.CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(
                name="frozen", served_entities=[pb.ServedEntity(model="m1", traffic_percentage=100)])),
                timeout=10)
        took = time.monotonic() - t0
        # Reads come from the view: resolving still answers (no replica: UNAVAILABLE, not Redis').
        with pytest.raises(grpc.aio.AioRpcError) as read:
            await stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="chat"), timeout=10)
        assert "no live replica" in read.value.details()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    e = from_rpc_error(err.value)
    assert isinstance(e, Unavailable) and e.retry_after == 1.0 and "Redis" in e.message
    assert took < 3, took


# ---------------------------------------------------------------- the registry (control plane)


def _ep(name: str, *models: str, **kw) -> pb.Endpoint:
    share = 100 // len(models)
    entities = [pb.ServedEntity(model=m, traffic_percentage=share + (100 - share * len(models) if i == 0 else 0))
                for i, m in enumerate(models)]
    return pb.Endpoint(name=name, served_entities=entities, **kw)


async def _next_snapshot(call, want, timeout: float = 1.0):
    """Read the watch stream until ``want(snapshot)``; fail after ``timeout`` seconds."""
    async def read():
        while True:
            snap = await call.read()
            assert snap is not grpc.aio.EOF, "the watch stream ended"
            if want(snap):
                return snap
    return await asyncio.wait_for(read(), timeout)


async def test_watch_streams_the_registry_and_every_change_within_a_second(stub, model_server):
    call = stub.WatchRegistry(pb.WatchRegistryRequest())
    try:
        first = await _next_snapshot(call, lambda s: True)
        assert {"chat", "old"} <= {e.name for e in first.endpoints} and first.version >= 1
        reg = await model_server.RegisterReplica(
            pb.RegisterReplicaRequest(replica=_replica("10.0.1.1:1"), ttl_seconds=30))
        t0 = time.monotonic()
        snap = await _next_snapshot(call, lambda s: any(r.id == reg.id for r in s.replicas))
        assert time.monotonic() - t0 < 1.0
        (mine,) = [r for r in snap.replicas if r.id == reg.id]
        assert mine.address == "10.0.1.1:1" and 0 < mine.expires_in_ms <= 30_000
        await model_server.DeregisterReplica(pb.DeregisterReplicaRequest(id=reg.id))
        await _next_snapshot(call, lambda s: all(r.id != reg.id for r in s.replicas))
    finally:
        call.cancel()


def _content(snap: pb.WatchRegistryResponse) -> bytes:
    """What a watcher acts on: the snapshot without the leases' countdowns."""
    copy = pb.WatchRegistryResponse()
    copy.CopyFrom(snap)
    for r in copy.replicas:
        r.expires_in_ms = 0
    return copy.SerializeToString(deterministic=True)


async def test_beats_that_only_renew_a_lease_wake_no_one_and_a_new_load_does(
        stub, model_server, routing_env):
    """An idle fleet's heartbeats publish nothing in Redis and send watchers nothing (routing
    still rebuilds every second); a heartbeat with a new load reaches watchers within a second
    (at once when none was sent for a while); a new replica at once."""
    import redis.asyncio as aioredis

    reg = await model_server.RegisterReplica(
        pb.RegisterReplicaRequest(replica=_replica("10.0.1.9:1", inflight=2), ttl_seconds=30))
    call = stub.WatchRegistry(pb.WatchRegistryRequest())
    client = aioredis.from_url(routing_env[3].url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("fmapi:registry:changes")
    try:
        last = await _next_snapshot(call, lambda s: any(r.id == reg.id for r in s.replicas))
        published = 0
        # 2.5 s of beats at the same load: 2 of routing's 1 s rebuilds, half the 5 s keep-alive.
        deadline = time.monotonic() + 2.5
        read = asyncio.ensure_future(call.read())
        while time.monotonic() < deadline:
            assert (await model_server.Heartbeat(
                pb.HeartbeatRequest(id=reg.id, inflight=2))).known
            while await pubsub.get_message(timeout=0.05) is not None:
                published += 1
            done, _ = await asyncio.wait({read}, timeout=0.4)
            if done:  # only a snapshot that differs (another test's replica expiring) may come
                snap = read.result()
                assert snap is not grpc.aio.EOF
                assert _content(snap) != _content(last), "a watcher got an unchanged snapshot"
                last = snap
                read = asyncio.ensure_future(call.read())
        assert published == 0, f"{published} change messages for beats that changed nothing"

        async def until(want, timeout: float, first=None):
            t0 = time.monotonic()
            snap = await asyncio.wait_for(first, timeout) if first else None
            while snap is None or not want(snap):
                snap = await asyncio.wait_for(call.read(), timeout - (time.monotonic() - t0))
            return time.monotonic() - t0

        def load(n):
            return lambda s: any(r.id == reg.id and r.inflight == n for r in s.replicas)

        assert (await model_server.Heartbeat(pb.HeartbeatRequest(id=reg.id, inflight=5))).known
        assert await until(load(5), 1.0, read) < 1.0  # nothing sent for a while: at once
        assert await pubsub.get_message(timeout=0.5) is not None  # the new load was published
        # Load news right after a snapshot waits for routing's load_update_seconds (1 s) ...
        assert (await model_server.Heartbeat(pb.HeartbeatRequest(id=reg.id, inflight=6))).known
        assert 0.3 <= await until(load(6), 2.5) <= 2.0
        # ... a new replica does not.
        other = await model_server.RegisterReplica(
            pb.RegisterReplicaRequest(replica=_replica("10.0.1.10:1"), ttl_seconds=30))
        assert await until(lambda s: any(r.id == other.id for r in s.replicas), 1.0) < 0.5
        await model_server.DeregisterReplica(pb.DeregisterReplicaRequest(id=other.id))
    finally:
        call.cancel()
        await pubsub.aclose()
        await client.aclose()
        await model_server.DeregisterReplica(pb.DeregisterReplicaRequest(id=reg.id))


async def test_endpoints_are_created_updated_and_deleted_at_run_time(stub, model_server):
    reg = await model_server.RegisterReplica(
        pb.RegisterReplicaRequest(replica=_replica("10.0.1.2:1"), ttl_seconds=30))
    call = stub.WatchRegistry(pb.WatchRegistryRequest())
    try:
        created = await stub.CreateEndpoint(pb.CreateEndpointRequest(endpoint=_ep("rt", "m1")))
        # The task follows from the model's servers (a generation model: chat).
        assert created.endpoint.task == pb.TASK_CHAT and created.endpoint.config_version == 1
        snap = await _next_snapshot(call, lambda s: s.version >= created.version)
        assert "rt" in {e.name for e in snap.endpoints}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateEndpoint(pb.CreateEndpointRequest(endpoint=_ep("rt", "m1")))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

        limits = pb.Endpoint(name="rt", limits=pb.Limits(requests_per_minute=7))
        updated = await stub.UpdateEndpoint(pb.UpdateEndpointRequest(
            endpoint=limits, update_mask={"paths": ["limits.requests_per_minute"]}))
        assert updated.endpoint.limits.requests_per_minute == 7
        assert updated.endpoint.config_version == 1  # limits are not a config change
        snap = await _next_snapshot(call, lambda s: s.version >= updated.version)
        (rt,) = [e for e in snap.endpoints if e.name == "rt"]
        assert rt.limits.requests_per_minute == 7 and rt.served_entities[0].model == "m1"

        # Refused changes name what is wrong, and the endpoint keeps its config.
        for endpoint, paths, code, words in [
            (_ep("rt", "nope"), ["served_entities"], grpc.StatusCode.INVALID_ARGUMENT, "unknown"),
            (pb.Endpoint(name="rt", fallbacks=["ghost"]), ["fallbacks"],
             grpc.StatusCode.FAILED_PRECONDITION, "ghost"),
            (pb.Endpoint(name="rt", retired=True), ["retired"],
             grpc.StatusCode.FAILED_PRECONDITION, "replacement"),
            (_ep("rt", "m1"), ["name"], grpc.StatusCode.INVALID_ARGUMENT, "update_mask"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.UpdateEndpoint(pb.UpdateEndpointRequest(
                    endpoint=endpoint, update_mask={"paths": paths}))
            assert err.value.code() == code and words in err.value.details(), err.value.details()
        got = await stub.GetEndpoint(pb.GetEndpointRequest(name="rt"))
        assert got.endpoint.served_entities[0].model == "m1" and not got.endpoint.retired

        # An endpoint another one falls back to cannot go.
        await stub.CreateEndpoint(pb.CreateEndpointRequest(endpoint=_ep("rt2", "m1", fallbacks=["rt"])))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.DeleteEndpoint(pb.DeleteEndpointRequest(name="rt"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "rt" in err.value.details()
        await stub.DeleteEndpoint(pb.DeleteEndpointRequest(name="rt2"))
        gone = await stub.DeleteEndpoint(pb.DeleteEndpointRequest(name="rt"))
        snap = await _next_snapshot(call, lambda s: s.version >= gone.version)
        assert not {"rt", "rt2"} & {e.name for e in snap.endpoints}
    finally:
        call.cancel()
        await model_server.DeregisterReplica(pb.DeregisterReplicaRequest(id=reg.id))


async def test_a_config_waits_for_its_models_replicas_and_a_second_update_is_refused(
        stub, model_server):
    # m2 is known (a server registered it once) but has no live replica now.
    gone = await model_server.RegisterReplica(pb.RegisterReplicaRequest(
        replica=pb.Replica(address="10.0.1.3:1", models=["m2"], kind=pb.REPLICA_KIND_GENERATION)))
    await model_server.DeregisterReplica(pb.DeregisterReplicaRequest(id=gone.id))
    live = await model_server.RegisterReplica(
        pb.RegisterReplicaRequest(replica=_replica("10.0.1.4:1"), ttl_seconds=30))
    await stub.CreateEndpoint(pb.CreateEndpointRequest(endpoint=_ep("pend", "m1")))
    try:
        await asyncio.sleep(0.2)  # routing's view has m2 without replicas
        up = await stub.UpdateEndpoint(pb.UpdateEndpointRequest(
            endpoint=_ep("pend", "m2"), update_mask={"paths": ["served_entities"]}))
        assert up.endpoint.config_update == pb.CONFIG_UPDATE_STATE_IN_PROGRESS
        assert [se.model for se in up.endpoint.served_entities] == ["m1"]  # the old one serves
        assert [se.model for se in up.endpoint.pending_served_entities] == ["m2"]
        res = await stub.ResolveEndpoint(pb.ResolveEndpointRequest(name="pend"))
        assert res.model == "m1"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UpdateEndpoint(pb.UpdateEndpointRequest(
                endpoint=_ep("pend", "m1"), update_mask={"paths": ["served_entities"]}))
        assert err.value.code() == grpc.StatusCode.ABORTED and "in progress" in err.value.details()

        # m2 comes up: the pending config takes over within a second.
        back = await model_server.RegisterReplica(pb.RegisterReplicaRequest(
            replica=pb.Replica(address="10.0.1.5:1", models=["m2"], kind=pb.REPLICA_KIND_GENERATION),
            ttl_seconds=30))

        async def promoted():
            ep = (await stub.GetEndpoint(pb.GetEndpointRequest(name="pend"))).endpoint
            return (ep.config_update == pb.CONFIG_UPDATE_STATE_NOT_UPDATING
                    and [se.model for se in ep.served_entities] == ["m2"] and ep)
        ep = await eventually(promoted, timeout=1.5)
        assert ep.config_version == 2 and not ep.pending_served_entities
        await model_server.DeregisterReplica(pb.DeregisterReplicaRequest(id=back.id))

        # A config whose models never come up fails after the pending timeout (3 s here); the
        # current config keeps serving.
        await stub.UpdateEndpoint(pb.UpdateEndpointRequest(
            endpoint=_ep("pend", "m1"), update_mask={"paths": ["served_entities"]}))
        await asyncio.sleep(0.3)
        await model_server.DeregisterReplica(pb.DeregisterReplicaRequest(id=live.id))
        live = None
        await stub.UpdateEndpoint(pb.UpdateEndpointRequest(
            endpoint=_ep("pend", "m2"), update_mask={"paths": ["served_entities"]}))

        async def failed():
            ep = (await stub.GetEndpoint(pb.GetEndpointRequest(name="pend"))).endpoint
            return ep.config_update == pb.CONFIG_UPDATE_STATE_UPDATE_FAILED and ep
        ep = await eventually(failed, timeout=5)
        assert [se.model for se in ep.served_entities] == ["m1"] and not ep.pending_served_entities
    finally:
        if live is not None:
            await model_server.DeregisterReplica(pb.DeregisterReplicaRequest(id=live.id))
        await stub.DeleteEndpoint(pb.DeleteEndpointRequest(name="pend"))


async def test_two_routing_replicas_share_the_registry_and_apply_is_idempotent(routing_env, stub):
    _, sup, tmp, redis = routing_env
    second = start_routing(sup, tmp, redis, name="routing-2")  # applies the same file at start
    async with tls.aio_channel(second, "gateway", "routing") as ch:
        other = routing_pb2_grpc.RoutingServiceStub(ch)
        call = other.WatchRegistry(pb.WatchRegistryRequest())
        try:
            before = await _next_snapshot(call, lambda s: True, timeout=5)
            declared = [_ep("applied", "m1", description="from a file", task=pb.TASK_CHAT)]
            first = await stub.ApplyEndpoints(pb.ApplyEndpointsRequest(endpoints=declared))
            assert list(first.created) == ["applied"] and first.version > before.version
            # A read through the other replica right after the write sees it, before that
            # replica's view has caught up (the Databricks SDK's create().result() reads at
            # once, through whichever gateway and routing replica).
            got = await other.GetEndpoint(pb.GetEndpointRequest(name="applied"))
            assert got.endpoint.description == "from a file"
            # The change made through one replica reaches the other's watchers within a second.
            t0 = time.monotonic()
            await _next_snapshot(call, lambda s: s.version >= first.version)
            assert time.monotonic() - t0 < 1.0
            again = await other.ApplyEndpoints(pb.ApplyEndpointsRequest(endpoints=declared))
            assert list(again.unchanged) == ["applied"] and again.version == first.version
            pruned = await other.ApplyEndpoints(pb.ApplyEndpointsRequest(
                endpoints=declared + [_ep("chat", "m1", task=pb.TASK_CHAT)], prune=True))
            assert sorted(pruned.deleted) == ["old"] and list(pruned.updated) == []
            # So does an update's (update_config().result()).
            await stub.UpdateEndpoint(pb.UpdateEndpointRequest(
                endpoint=pb.Endpoint(name="applied", description="changed"),
                update_mask={"paths": ["description"]}))
            got = await other.GetEndpoint(pb.GetEndpointRequest(name="applied"))
            assert got.endpoint.description == "changed"
        finally:
            call.cancel()
    # Put the module's registry back as the file declares it.
    old = pb.Endpoint(name="old", retired=True, replacement="chat", task=pb.TASK_CHAT,
                      served_entities=[pb.ServedEntity(model="m1", traffic_percentage=100)])
    await stub.ApplyEndpoints(pb.ApplyEndpointsRequest(endpoints=[old]))
    await stub.DeleteEndpoint(pb.DeleteEndpointRequest(name="applied"))


async def test_a_gateway_copy_survives_a_silent_routing_and_picks_up_after(routing_env, monkeypatch):
    """A routing replica that stops answering (SIGSTOP: its connection stays open, no word): the
    gateway's copy keeps serving its last snapshot, notices the silence, re-opens, and takes the
    next snapshot once routing is back."""
    import os
    import signal

    from fmapi_gateway import registry as gw_registry

    _, sup, tmp, redis = routing_env
    addr = start_routing(sup, tmp, redis, name="routing-silent")
    child = next(c for c in sup.children if c.name == "routing-silent")
    monkeypatch.setattr(gw_registry, "SILENCE_S", 1.0)
    async with tls.aio_channel(addr, "gateway", "routing") as ch:
        copy = gw_registry.LocalRegistry(routing_pb2_grpc.RoutingServiceStub(ch))
        await copy.start(wait_s=10)
        version = copy.view.version
        assert version >= 1 and "chat" in copy.view.endpoints
        os.kill(child.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(2.5)  # silence past SILENCE_S: the stream is re-opened
            assert copy.router.endpoint("chat").name == "chat"  # the last copy still serves
            assert copy.view.version == version
        finally:
            os.kill(child.proc.pid, signal.SIGCONT)
        seen = copy.received_at
        deadline = time.monotonic() + 10
        while copy.received_at == seen and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert copy.received_at > seen  # snapshots flow again
        await copy.close()


async def test_the_registry_view_stops_even_when_a_change_arrives_as_it_is_stopped(tmp_path):
    """A routing replica sent SIGTERM right after it started hung (1 run in 15 under load): a
    change woke the rebuilder in the same moment as its cancellation, Python 3.11's
    ``asyncio.wait_for`` swallowed the cancellation, and stopping waited for it forever."""
    from fmapi_common.redis_client import make_redis
    from fmapi_routing.registry import RegistryStore
    from fmapi_routing.replicas import ReplicaStore
    from fmapi_routing.view import RegistryView

    redis = RedisServer(tmp_path).start()
    client = make_redis(redis.url, name="test", timeout=2, max_connections=4,
                        decode_responses=False)
    subscriber = make_redis(redis.url, name="test-changes", timeout=2, max_connections=2,
                            subscriber=True)
    try:
        # The change lands a few loop turns before the stop: one of them is the window.
        for turns in range(6):
            view = RegistryView(RegistryStore(client), ReplicaStore(client), subscriber,
                                refresh_s=30, coalesce_s=0)
            await view.start()
            await asyncio.sleep(0.05)  # its tasks now wait for a change
            view.poke()
            for _ in range(turns):
                await asyncio.sleep(0)
            t0 = time.monotonic()
            async with asyncio.timeout(5):
                await view.stop()
            assert time.monotonic() - t0 < 1, f"stop took {time.monotonic() - t0:.1f} s"
    finally:
        await client.aclose()
        await subscriber.aclose()
        redis.stop()
