"""Wiring: Redis clients, token store, both servicers on one grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from envoy.service.auth.v3 import external_auth_pb2_grpc

from fmapi.auth.v1 import auth_pb2_grpc
from fmapi_common.errors import Unavailable
from fmapi_common.redis_client import make_redis as make_client
from fmapi_common.server import GrpcService, start_grpc_service
from fmapi_common.telemetry import setup_telemetry
from fmapi_common.tls import ENVOY, GATEWAY

from . import extauthz, servicer
from .config import AuthConfig
from .tokens import TokenStore

log = logging.getLogger(__name__)


def make_redis(config: AuthConfig, *, for_pubsub: bool = False) -> aioredis.Redis:
    return make_client(config.redis_url, name="auth", timeout=config.redis_timeout_seconds,
                       max_connections=config.redis_max_connections, subscriber=for_pubsub)


def make_store(config: AuthConfig) -> TokenStore:
    return TokenStore(
        make_redis(config),
        pubsub_redis=make_redis(config, for_pubsub=True),
        cache_ttl=config.cache_ttl_seconds,
        last_used_interval=config.last_used_interval_seconds,
    )


async def bootstrap(store: TokenStore, config: AuthConfig, *, timeout: float = 30.0) -> None:
    """Write the bootstrap admin token when configured, waiting for Redis up to ``timeout``."""
    if not config.bootstrap_admin_token_file:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            await store.ensure_bootstrap_admin(
                config.bootstrap_admin_token_file,
                principal=config.bootstrap_admin_principal,
                workspace=config.bootstrap_workspace,
            )
            return
        except Unavailable as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"fmapi-auth: cannot bootstrap the admin token: {exc.message}")
            log.warning("waiting for Redis to bootstrap the admin token: %s", exc.message)
            await asyncio.sleep(0.5)


async def start(config: AuthConfig) -> tuple[GrpcService, TokenStore]:
    """Start the server (AuthService + Envoy Authorization + health + reflection)."""
    store = make_store(config)
    await store.start()
    await bootstrap(store, config)
    key = config.identity_key_bytes()

    def register(server) -> list[str]:
        auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer.AuthServicer(store), server)
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            extauthz.AuthorizationServicer(
                store,
                key,
                strip_authorization=config.strip_authorization,
            ),
            server,
        )
        return [servicer.SERVICE_NAME, extauthz.SERVICE_NAME]

    # Check answers every request Envoy sees: no span or error wrapper per call (it maps its own
    # errors); AuthService keeps both.
    # Only Envoy asks Check; only the gateway manages tokens (for admins it has authenticated).
    policy = {f"/{servicer.SERVICE_NAME}/": [GATEWAY], extauthz.CHECK_METHOD: [ENVOY]}
    svc = await start_grpc_service(
        config, register, policy=policy, bare_methods=[extauthz.CHECK_METHOD]
    )
    svc.on_stop.append(store.close)
    return svc, store


async def serve(config: AuthConfig) -> None:
    setup_telemetry("auth")
    svc, _ = await start(config)
    await svc.serve_until_signal()
