"""The gateway's REST app in-process (no Envoy, no network): an httpx client over ASGI."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from fmapi_gateway.backends import Backends
from fmapi_gateway.config import GatewayConfig
from fmapi_gateway.rest import build_app
from fmapi_gateway.tokens_api import TokensApi

KEY = "cd" * 32  # the identity key of these configs


def unreachable_config(**kw) -> GatewayConfig:
    """A gateway config whose backends all point at a closed port."""
    return GatewayConfig(routing_addr="127.0.0.1:1", auth_addr="127.0.0.1:1",
                         quota_addr="127.0.0.1:1", identity_key=KEY, insecure=True, **kw)


@contextlib.asynccontextmanager
async def app_client(config: GatewayConfig, backends: type[Backends] = Backends
                     ) -> AsyncIterator[httpx.AsyncClient]:
    backend = backends(config.routing_addr, config.backend_timeout_s, None)
    tokens = TokensApi(config.auth_addr, None)
    app = build_app(config, backend, tokens)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gw") as c:
            yield c
    finally:
        await backend.close()
        await tokens.close()
