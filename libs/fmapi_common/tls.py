"""Mutual TLS between fmapi's processes, and per-method authorization of the calling service.

Every internal gRPC server requires a client certificate signed by the deployment's CA and
learns the caller's identity from it (the certificate's subject common name: ``gateway``,
``envoy``, ``generation``, ...). Each server declares a :data:`Policy`, the identities allowed
per method, and :class:`AuthorizationInterceptor` refuses everything else with
PERMISSION_DENIED; a method the policy does not name is refused too (deny by default). Clients
verify the server they dial against the identity they expect (``server_name``), so a process
that is not, say, routing cannot pose as routing even with a valid certificate of its own.

Certificates are read from files. gRPC servers re-read them when the files change (checked at
most every few seconds, on new connections); clients' channel credentials, the gateway's HTTPS
port and Envoy read them at start, so rotating a client certificate means restarting that
process (a rolling restart in Kubernetes) before the old certificate expires.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import grpc

from .interceptors import wrap_handler

log = logging.getLogger(__name__)

# The identities of fmapi's processes (their certificates' common names).
ENVOY = "envoy"
AUTH = "auth"
ROUTING = "routing"
QUOTA = "quota"
GATEWAY = "gateway"
GENERATION = "generation"
EMBEDDING = "embedding"
USAGE = "usage"
IDENTITIES = (ENVOY, AUTH, ROUTING, QUOTA, GATEWAY, GENERATION, EMBEDDING, USAGE)
#: Model servers: the only identities that may register replicas with routing.
MODEL_SERVERS = (GENERATION, EMBEDDING)

#: Any authenticated fmapi service (a certificate signed by the CA), e.g. for health checks.
ANY = "*"

#: ``{"/pkg.Service/Method" or "/pkg.Service/": allowed identities}``; a method's own entry wins
#: over its service's.
Policy = Mapping[str, Iterable[str]]

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_RELOAD_CHECK_SECONDS = 5.0


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass
class TlsFiles:
    """One process's certificate, its key, and the CA its peers' certificates must chain to."""

    ca: str
    cert: str
    key: str
    _stamp: tuple = field(default=(), init=False, repr=False)
    _checked: float = field(default=0.0, init=False, repr=False)
    _channel_creds: grpc.ChannelCredentials | None = field(default=None, init=False, repr=False)

    def _mtimes(self) -> tuple:
        return tuple(os.stat(p).st_mtime_ns for p in (self.ca, self.cert, self.key))

    def check(self) -> None:
        """Raise ``SystemExit`` with a clear message when a file is missing or unreadable."""
        for what, p in (("CA", self.ca), ("certificate", self.cert), ("key", self.key)):
            try:
                _read(p)
            except OSError as exc:
                raise SystemExit(f"cannot read the TLS {what} file {p}: {exc.strerror}") from None

    def _server_config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(_read(self.key), _read(self.cert))], root_certificates=_read(self.ca)
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that require a client certificate and reload changed files."""
        self._stamp = self._mtimes()
        self._checked = time.monotonic()

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC before each new handshake; None keeps the current configuration.
            now = time.monotonic()
            if now - self._checked < _RELOAD_CHECK_SECONDS:
                return None
            self._checked = now
            try:
                stamp = self._mtimes()
                if stamp == self._stamp:
                    return None
                config = self._server_config()
            except (OSError, ValueError) as exc:
                log.warning("keeping the current TLS certificate: reload failed: %s", exc)
                return None
            self._stamp = stamp
            log.info("TLS certificate files changed: reloaded")
            return config

        return grpc.dynamic_ssl_server_credentials(
            self._server_config(), fetch, require_client_authentication=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if self._channel_creds is None:
            self._channel_creds = grpc.ssl_channel_credentials(
                root_certificates=_read(self.ca),
                private_key=_read(self.key),
                certificate_chain=_read(self.cert),
            )
        return self._channel_creds


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The calling service's identity (its certificate's common name), None without TLS."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode("utf-8", "replace") if names else None


def cert_identity(peercert: dict | None) -> str | None:
    """The common name in a certificate as Python's ``ssl`` module returns it (``getpeercert``)."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class AuthorizationInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only when its peer's identity is allowed for the method."""

    def __init__(self, policy: Policy) -> None:
        self._policy = {k: frozenset(v) for k, v in policy.items()}

    def allowed(self, method: str) -> frozenset[str]:
        exact = self._policy.get(method)
        if exact is not None:
            return exact
        return self._policy.get(method[: method.rfind("/") + 1], frozenset())

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        allowed = self.allowed(method)
        handler = await continuation(handler_call_details)
        if handler is None or ANY in allowed:
            # ANY: the TLS handshake already proved the peer holds a certificate from our CA.
            return handler
        return _guarded(handler, method, allowed)


def _guarded(handler: grpc.RpcMethodHandler, method: str, allowed: frozenset[str]):
    async def check(context) -> None:
        who = peer_identity(context)
        if who not in allowed:
            log.warning("refused %s to %s", method, who)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{who or 'this caller'} may not call {method}")

    return wrap_handler(handler, before=check)
