"""One way to build and run a ``grpc.aio`` server.

Every service gets mutual TLS with per-method authorization of the calling service (its
:data:`~fmapi_common.tls.Policy`), the standard health service, reflection when configured, the
error-mapping and tracing interceptors, a call counter (Prometheus, on ``metrics_port`` when set),
a bound port (0 in tests, written to ``port_file`` for a supervisor) and a graceful shutdown on SIGTERM/SIGINT: health flips to NOT_SERVING, in-flight
calls get ``grace_seconds``, then the shutdown hooks run.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import grpc
import prometheus_client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from .config import ServiceConfig
from .interceptors import ErrorInterceptor
from .telemetry import server_interceptors, shutdown_telemetry
from .tls import ANY, HEALTH_PREFIX, REFLECTION_PREFIXES, AuthorizationInterceptor, Policy

log = logging.getLogger(__name__)

RPCS_STARTED = prometheus_client.Counter(
    "fmapi_grpc_server_started", "gRPC calls received, by service and method",
    ["grpc_service", "grpc_method"])

Hook = Callable[[], Awaitable[None]]


@dataclass
class GrpcService:
    """A started server, its bound port and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    service_names: list[str]
    grace_seconds: float
    # Run first on shutdown, while calls still flow (e.g. deregister from routing).
    on_drain: list[Hook] = field(default_factory=list)
    # Run after the server stopped (close clients, flush).
    on_stop: list[Hook] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        if serving:
            freeze_heap()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self) -> None:
        await self.set_serving(False)
        await _run_hooks(self.on_drain)
        await self.server.stop(self.grace_seconds)
        await _run_hooks(self.on_stop)

    async def serve_until_signal(self) -> None:
        """Block until SIGTERM or SIGINT, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.ensure_future(self.server.wait_for_termination())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        log.info("shutting down")
        await self.stop()
        waiter.cancel()
        stopper.cancel()
        shutdown_telemetry()


def freeze_heap() -> None:
    """Take every object alive now out of the cyclic garbage collector's sight, once the process
    is ready to serve (modules, models, clients: they live as long as the process).

    A full collection walks every tracked object, and CPython runs one whenever the objects that
    survived collections grow by a quarter: with vLLM, torch and transformers loaded that is
    about 700k objects, 0.35-0.4 s on 2 cores, during which the process's event loop stalls
    every stream it serves. vLLM's own server does the same after its start. Garbage made before
    the freeze is collected first; what is made later is collected as usual. Only the first
    call does anything (a service that goes back to serving does not pay the collection again)."""
    global _frozen
    if _frozen:
        return
    _frozen = True
    gc.collect()
    gc.freeze()


_frozen = False


async def start_grpc_service(
    config: ServiceConfig,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    *,
    policy: Policy,
    serving: bool = True,
    bare_methods: Iterable[str] = (),
    public: bool = False,
) -> GrpcService:
    """Build, bind and start a server.

    ``register`` adds the servicers and returns their full service names (for health and
    reflection). ``policy`` names the identities allowed to call each method (the health service
    and reflection are open to every authenticated service); anything else is PERMISSION_DENIED.
    With ``serving=False`` health answers NOT_SERVING until ``set_serving(True)``.
    ``bare_methods`` (full names, ``/package.Service/Method``) skip the tracing and error-mapping
    interceptors: per-request hot paths that map their own errors and whose caller traces them
    (Envoy's ext_authz ``Check``); every other method keeps both. Calls are traced only when
    this process exports spans, except on a ``public`` server (the gateway's public API): there
    every call's span is what its response's trace id names.
    """
    # Health's Watch streams with context.write (a coroutine, not a generator), which the
    # tracing interceptor cannot wrap; it needs neither tracing nor error mapping.
    bare = (*bare_methods, "/grpc.health.v1.Health/Watch")
    tls = config.tls()
    if tls is None:
        log.warning("INSECURE: internal calls are neither encrypted nor authenticated")
        authz = []
    else:
        tls.check()
        open_ = {HEALTH_PREFIX: [ANY], **({p: [ANY] for p in REFLECTION_PREFIXES} if config.reflection else {})}
        authz = [AuthorizationInterceptor({**open_, **policy})]
    server = grpc.aio.server(
        interceptors=[
            CountingInterceptor(),
            *authz,
            *server_interceptors(exclude_methods=bare, always=public),
            ErrorInterceptor(exclude_methods=bare),
        ],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    names = list(register(server))
    hs = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    if config.reflection:
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
    address = f"{config.host}:{config.port}"
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, tls.server_credentials())
    if port == 0:
        raise SystemExit(f"could not bind {config.host}:{config.port}")
    await server.start()
    svc = GrpcService(server, port, hs, names, config.grace_seconds)
    await svc.set_serving(serving)
    if config.port_file:
        write_port_file(config.port_file, port)
    log.info("listening on %s:%d (%s)", config.host, port, ", ".join(names))
    if config.metrics_port is not None:
        start_metrics_server(config.host, config.metrics_port, config.metrics_port_file)
    return svc


class CountingInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call by method (``fmapi_grpc_server_started_total``), refused ones too."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        # Only methods this server has: a caller's made-up names would grow the label set.
        service, method = ("unknown", "unknown") if handler is None else \
            handler_call_details.method.lstrip("/").rpartition("/")[::2]
        RPCS_STARTED.labels(service, method).inc()
        return handler


def start_metrics_server(host: str, port: int, port_file: str | None) -> int:
    """Serve Prometheus' text format on ``host:port`` (a thread); returns the bound port."""
    server, _ = prometheus_client.start_http_server(port, addr=host)
    bound = server.server_port
    if port_file:
        write_port_file(port_file, bound)
    log.info("metrics on %s:%d/metrics", host, bound)
    return bound


async def _run_hooks(hooks: list[Hook]) -> None:
    for hook in hooks:
        try:
            await hook()
        except Exception:
            log.exception("shutdown hook failed")


def write_port_file(path: str, port: int) -> None:
    """Write atomically so a reader never sees a half-written number."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, path)
