"""Clients for the internal services the gateway calls (routing, embedding, generation), and
the gateway's copy of the registry that requests resolve against."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from fmapi.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from fmapi.routing.v1 import routing_pb2, routing_pb2_grpc
from fmapi_common.channels import ChannelPool, make_channel
from fmapi_common.errors import (
    UNREACHABLE,
    DeadlineExceeded,
    FmapiError,
    Unavailable,
    from_rpc_error,
)
from fmapi_common.tls import EMBEDDING, GENERATION, ROUTING, TlsFiles
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fmapi_common.router import Resolution

from .config import DEFAULT_REQUEST_TIMEOUT_S
from .quota import Quota
from .registry import LocalRegistry


T = TypeVar("T")

# How long one health check of every backend answers GET /healthz (public: a flood of it must
# not fan out to every replica).
HEALTH_TTL_S = 1.0

# How long a model server that failed UNAVAILABLE is avoided (a dead one's registration lives
# up to its TTL, 10 s, without heartbeats).
UNREACHABLE_AVOID_S = 10.0


class Backends:
    """``idle_timeout`` bounds every wait for a backend's next message (a unary answer, a
    stream's first or next message, keep-alives included); ``request_timeout`` caps a whole
    request unless its endpoint sets ``limits.request_timeout_seconds``."""

    def __init__(self, routing_addr: str, idle_timeout: float, tls: TlsFiles | None,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S, quota: Quota | None = None) -> None:
        # Admission and settlement (None only in tests of the gateway's other parts).
        self.quota = quota
        self._routing_channel = make_channel(routing_addr, tls, ROUTING)
        self.routing = routing_pb2_grpc.RoutingServiceStub(self._routing_channel)
        self.registry = LocalRegistry(self.routing)
        self.pool = ChannelPool(tls)
        self.idle_timeout = idle_timeout
        # What a model server is asked to send keep-alives at, while a request is queued or
        # prefilling without output: a third of the idle timeout, so that a busy server is
        # never taken for a frozen one (a request may wait longer than the idle timeout for
        # its first token on a loaded server, or for a long prompt's prefill).
        self.keepalive_ms = max(1, int(idle_timeout * 1000 / 3))
        self.request_timeout = request_timeout
        # Model-server addresses that just failed UNAVAILABLE -> until when to avoid them.
        self._down: dict[str, float] = {}
        # The last check of every backend's health (shared by GET /healthz callers).
        self._health: asyncio.Future[dict[str, str]] | None = None
        self._health_at = float("-inf")

    async def start(self) -> None:
        await self.registry.start()

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
        await self.registry.close()
        if self.quota is not None:
            await self.quota.close()
        await self._routing_channel.close()
        await self.pool.close()

    # Reads of the registry: the local copy, no call.

    async def resolve(self, name: str) -> Resolution:
        now = time.monotonic()
        avoid = frozenset(a for a, until in self._down.items() if until > now)
        return self.registry.router.resolve(name, avoid)

    def unreachable(self, address: str, exc: FmapiError) -> bool:
        """A call to the model server at ``address`` failed with ``exc``: if the server is gone
        (the transport failed; not a live server refusing), avoid it for a while (its
        registration outlives it by up to its TTL) and return True, so the caller may try
        another replica."""
        if not isinstance(exc, Unavailable) or exc.reason != UNREACHABLE:
            return False
        self._down[address] = time.monotonic() + UNREACHABLE_AVOID_S
        if len(self._down) > 1024:  # forget the oldest: a bound, not a policy
            self._down = dict(sorted(self._down.items(), key=lambda kv: kv[1])[-512:])
        return True

    async def get_endpoint(self, name: str) -> routing_pb2.Endpoint:
        return self.registry.router.endpoint(name)

    def endpoint_label(self, name: str) -> str:
        """``name`` if such an endpoint exists, else "": a refused request's metric label (a
        bounded set, whatever names callers send)."""
        try:
            return self.registry.router.endpoint(name).name
        except FmapiError:
            return ""

    async def on_live_replica(self, name: str, res: Resolution,
                              call: Callable[[Resolution], Awaitable[T]]) -> tuple[Resolution, T]:
        """``call(res)`` on the model server ``res`` chose. If that server is gone (killed, its
        registration not expired yet), endpoint ``name`` is resolved again, avoiding it, and
        called on another; returns the resolution that answered. (Only for calls that may run
        twice: counting, or an embedding whose admission is charged once by request id.)"""
        try:
            return res, await call(res)
        except FmapiError as exc:
            if not self.unreachable(res.replica.address, exc):
                raise
        res = await self.resolve(name)
        return res, await call(res)

    async def list_endpoints(self) -> list[routing_pb2.Endpoint]:
        view = self.registry.view
        view.require_loaded()
        return list(view.endpoints.values())

    async def live_models(self) -> set[str]:
        """Models with at least one live replica."""
        return self.registry.view.live_models()

    async def admin(self, method: str, request):
        """A change of the registry (routing applies it; the local copy follows)."""
        try:
            return await getattr(self.routing, method)(request, timeout=10)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def request_cap(self, endpoint: routing_pb2.Endpoint) -> float:
        """Seconds one request to ``endpoint`` may take in all."""
        return endpoint.limits.request_timeout_seconds or self.request_timeout

    async def count_generation_tokens(self, address: str, requests) -> list:
        """Prompt tokens and output reservation of each request (the model server's tokenizer
        and chat template, and Generate's own checks)."""
        from fmapi.generation.v1 import generation_pb2, generation_pb2_grpc

        stub = generation_pb2_grpc.GenerationServiceStub(self.pool.get(address, GENERATION))
        try:
            resp = await stub.CountTokens(
                generation_pb2.CountTokensRequest(requests=requests), timeout=self.idle_timeout)
        except grpc.RpcError as exc:
            raise call_error(exc, f"the model server did not answer within {self.idle_timeout:g} s") from None
        return list(resp.counts)

    async def embed(self, address: str, request: embedding_pb2.EmbedRequest,
                    cap: float) -> embedding_pb2.EmbedResponse:
        """The embedding server's answer, within ``cap``. ``Embed`` is unary: a request queued
        behind others' large batches may rightly wait longer than the idle timeout, so each
        idle timeout without its answer the server's health service is asked instead, and the
        request is given up (504, the call cancelled) only when that goes unanswered for a
        third of the idle timeout, as a frozen or vanished server's would. Any answer, draining
        included, means the server is alive and still has the request."""
        channel = self.pool.get(address, EMBEDDING)
        call = embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(request, timeout=cap)
        answer = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait((answer,), timeout=self.idle_timeout)
                if done:
                    return answer.result()
                if not await _answers(channel, self.keepalive_ms / 1000):
                    raise DeadlineExceeded(
                        f"the embedding server did not answer within {self.idle_timeout:g} s, "
                        "nor its health check; the request was cancelled")
        except grpc.RpcError as exc:
            raise call_error(exc, f"the request ran past its {cap:g} s limit") from None
        finally:
            if not answer.done():
                call.cancel()

    async def health(self) -> dict[str, str]:
        """Health of routing and of every live replica, as reported by their health services,
        checked together. ``GET /healthz`` needs no token, so one check serves every caller
        for HEALTH_TTL_S: a flood of it costs the replicas nothing more. Replicas are named by
        kind and number, never by address (the answer is public)."""
        now = time.monotonic()
        if self._health is None or (self._health.done() and now - self._health_at >= HEALTH_TTL_S):
            self._health = asyncio.ensure_future(self._check_all())
            self._health_at = now
        return dict(await asyncio.shield(self._health))

    async def _check_all(self) -> dict[str, str]:
        replicas = sorted({r.id: r for rs in self.registry.view.replicas.values()
                           for r in rs}.values(), key=lambda r: (r.kind, r.id))
        kinds = [routing_pb2.ReplicaKind.Name(r.kind).removeprefix("REPLICA_KIND_").lower()
                 for r in replicas]
        states = await asyncio.gather(
            _check(self._routing_channel),
            *(_check(self.pool.get(r.address, kind)) for r, kind in zip(replicas, kinds)))
        out = {"routing": states[0], "registry": self.registry.status()}
        numbered = Counter()
        for kind, state in zip(kinds, states[1:]):
            numbered[kind] += 1
            out[f"{kind} {numbered[kind]}"] = state
        return out


async def _answers(channel: grpc.aio.Channel, timeout: float) -> bool:
    """Whether the server behind ``channel`` answers a health check within ``timeout``: any
    status, NOT_SERVING (draining) included, proves its event loop and gRPC server run."""
    try:
        await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError:
        return False
    return True


async def _check(channel: grpc.aio.Channel) -> str:
    try:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as exc:
        return f"UNREACHABLE ({exc.code().name})"


def call_error(exc: grpc.RpcError, timed_out: str) -> FmapiError:
    """The domain error for a failed backend call; the gateway's own deadline expiring gives
    :data:`DeadlineExceeded` saying ``timed_out``."""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(timed_out)
    return from_rpc_error(exc)


def open_generation(backends: Backends, address: str, request, cap: float):
    """Start a Generate stream on a replica, ending at the latest after ``cap`` seconds (the
    deadline aborts the engine request); the caller reads it and cancels it when done."""
    from fmapi.generation.v1 import generation_pb2_grpc

    stub = generation_pb2_grpc.GenerationServiceStub(backends.pool.get(address, GENERATION))
    request.keepalive_ms = backends.keepalive_ms
    return stub.Generate(request, timeout=cap)
