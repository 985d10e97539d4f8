"""Runs the REST API (uvicorn) and the public gRPC API in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fmapi.inference.v1 import inference_pb2, inference_pb2_grpc
from fmapi_common.server import start_grpc_service, write_port_file
from fmapi_common.telemetry import setup_telemetry, shutdown_telemetry
from fmapi_common.tls import ENVOY, cert_identity

from .backends import Backends
from .config import GatewayConfig
from .grpc_api import InferenceServicer
from .quota import Quota
from .rest import build_app
from .tokens_api import TokensApi
from .usage_api import UsageApi

log = logging.getLogger(__name__)
SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


class _FromEnvoyOnly(HttpToolsProtocol):
    """HTTP over mutual TLS where the client certificate must be Envoy's: the REST API is
    reachable only through the front door (the TLS layer already checked the CA)."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        who = cert_identity(ssl_object.getpeercert()) if ssl_object is not None else None
        if ssl_object is not None and who != ENVOY:
            log.warning("refused a REST connection from %s: only envoy may connect", who)
            transport.close()


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway stops both servers together."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _https(config: GatewayConfig) -> dict:
    """uvicorn settings for mutual TLS (nothing when running insecure)."""
    tls = config.tls()
    if tls is None:
        return {"http": "httptools"}
    tls.check()
    return {
        "http": _FromEnvoyOnly,
        "ssl_certfile": tls.cert,
        "ssl_keyfile": tls.key,
        "ssl_ca_certs": tls.ca,
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
    }


async def serve(config: GatewayConfig) -> None:
    setup_telemetry("gateway")
    tls = config.tls()
    backends = Backends(config.routing_addr, config.backend_timeout_s, tls,
                        request_timeout=config.request_timeout_s,
                        quota=None if config.unmetered else Quota(
                            config.quota_addr, tls, settle_linger=config.settle_linger_ms / 1000))
    await backends.start()
    tokens = TokensApi(config.auth_addr, tls)
    usage = UsageApi(config.usage_addr, tls)
    key = config.identity_key_bytes()

    def register(server):
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(backends, key), server
        )
        return [SERVICE]

    # The public API arrives through Envoy only.
    # Health says SERVING once the REST API listens too.
    grpc_svc = await start_grpc_service(config, register, policy={f"/{SERVICE}/": [ENVOY]},
                                        serving=False, public=True)

    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets that say they are TCP; without it every response waits ~40 ms (Nagle + delayed ACK).
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((config.host, config.http_port))
    http_port = sock.getsockname()[1]
    http = _Server(
        uvicorn.Config(
            build_app(config, backends, tokens, usage),
            loop="none",
            lifespan="off",
            access_log=False,
            server_header=False,
            log_level=config.log_level.lower(),
            timeout_keep_alive=75,
            timeout_graceful_shutdown=int(config.grace_seconds),
            **_https(config),
        )
    )
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    while not http.started and not http_task.done():
        await asyncio.sleep(0.01)
    if http_task.done():
        raise SystemExit(f"gateway: HTTP server failed to start: {http_task.exception()}")
    if config.http_port_file:
        write_port_file(config.http_port_file, http_port)
    log.info("REST API on %s:%d", config.host, http_port)
    await grpc_svc.set_serving(True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    http.should_exit = True
    await asyncio.gather(grpc_svc.stop(), http_task, return_exceptions=True)
    await backends.close()
    await tokens.close()
    await usage.close()
    shutdown_telemetry()
