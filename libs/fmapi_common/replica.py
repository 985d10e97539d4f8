"""A model server's registration with the routing service: register, heartbeat, deregister."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from fmapi.routing.v1 import routing_pb2, routing_pb2_grpc

from . import tasks
from .channels import make_channel
from .tls import ROUTING, TlsFiles

log = logging.getLogger(__name__)


class ReplicaRegistration:
    """Keeps one replica registered while the server runs.

    The registration lives ``ttl`` seconds without a heartbeat, so a replica that dies without
    deregistering drops out of routing on its own. A heartbeat answered "unknown" (routing lost
    its state, or the TTL passed during a pause) re-registers.
    """

    def __init__(
        self,
        routing_address: str,
        replica: routing_pb2.Replica,
        *,
        tls: TlsFiles | None,
        ttl: float = 10.0,
        interval: float = 2.0,
        inflight: Callable[[], int] = lambda: 0,
    ) -> None:
        self._channel = make_channel(routing_address, tls, ROUTING)
        self._stub = routing_pb2_grpc.RoutingServiceStub(self._channel)
        self._replica = replica
        self._ttl = ttl
        self._interval = interval
        self._inflight = inflight
        self._id: str | None = None
        self._task: asyncio.Task | None = None

    @property
    def replica_id(self) -> str | None:
        return self._id

    async def _register(self) -> None:
        resp = await self._stub.RegisterReplica(
            routing_pb2.RegisterReplicaRequest(replica=self._replica, ttl_seconds=int(self._ttl)),
            timeout=5,
            wait_for_ready=True,
        )
        self._id = resp.id
        log.info("registered replica %s at %s", resp.id, self._replica.address)

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.create_task(self._heartbeat_loop())

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                resp = await self._stub.Heartbeat(
                    routing_pb2.HeartbeatRequest(id=self._id or "", inflight=self._inflight()),
                    timeout=5,
                )
                if not resp.known:
                    await self._register()
            except grpc.RpcError as exc:
                log.warning("heartbeat to routing failed: %s", exc.code())

    async def stop(self) -> None:
        await tasks.stop(self._task)
        if self._id:
            try:
                await self._stub.DeregisterReplica(
                    routing_pb2.DeregisterReplicaRequest(id=self._id), timeout=2
                )
            except grpc.RpcError as exc:
                log.warning("deregistration failed: %s", exc.code())
        await self._channel.close()
