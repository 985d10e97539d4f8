"""Who is calling: the identity auth vouched for, verified on every request.

Envoy's ext_authz filter asks the auth service about every request and, when it allows it, sets
the ``x-fmapi-*`` identity headers with auth's HMAC signature. The gateway accepts only a
verified identity, so it cannot be used around Envoy, and it enforces the token's endpoint
scopes on every inference call (the endpoint is often named only in the body).
"""

from __future__ import annotations

import time

from fmapi_common.errors import PermissionDenied, Unauthenticated
from fmapi_common.identity import Identity, verify

from .http_common import error_response

# Paths answered without an identity (auth lets them through without a token too).
PUBLIC_PATHS = frozenset({"/healthz"})

_NO_IDENTITY = (
    "request carries no identity vouched for by fmapi's auth service; "
    "call the API through its public address with an API token"
)


def verified(headers, key: bytes, method: str, path: str) -> Identity:
    """The identity auth signed for this request (``method`` and ``path`` as received)."""
    ident = verify(headers, key, time.time(), method=method, path=path)
    if ident is None:
        raise Unauthenticated(_NO_IDENTITY, reason="unauthenticated")
    return ident


def require_query(identity: Identity, endpoint: str) -> None:
    if not identity.may_query(endpoint):
        raise PermissionDenied(
            f"this token may not query endpoint '{endpoint}'", param="model",
            reason="permission_denied",
        )


def require_admin(identity: Identity) -> None:
    if not identity.admin:
        raise PermissionDenied("this operation needs an admin token", reason="permission_denied")


class IdentityMiddleware:
    """Pure ASGI: verifies the identity headers; puts the Identity in ``scope['state']``."""

    def __init__(self, app, key: bytes) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        # The path exactly as Envoy forwarded it (and as auth saw it when signing).
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        try:
            scope.setdefault("state", {})["identity"] = verified(pairs, self.key, scope["method"], path)
        except Unauthenticated as exc:
            return await error_response(exc)(scope, receive, send)
        return await self.app(scope, receive, send)
