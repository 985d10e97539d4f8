"""gRPC client channels: mutual TLS, traced, size-limited, one per address."""

from __future__ import annotations

import json
import re

import grpc

from .telemetry import client_interceptors
from .tls import TlsFiles

_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 1),
]


# Several replicas behind one channel: calls go round robin over the replicas it is connected
# to; a replica that dies leaves the rotation as soon as its connection breaks, and comes back
# when it can be dialled again.
# A call that failed UNAVAILABLE (its replica died or refused it) is tried on another replica,
# for the methods that are safe to repeat: quota's (idempotent per request id), usage's reads,
# routing's reads, registrations and declarative apply. Not routing's create/update/delete of
# an endpoint (a change that was made, then retried, would answer 409/404) nor auth's token
# management (a token created twice is not the same as once).
_IPV4_PORT = re.compile(r"(\d{1,3}\.){3}\d{1,3}:\d{1,5}")
_ROUTING_REPEATABLE = ("ResolveEndpoint", "GetEndpoint", "ListEndpoints", "ListReplicas",
                       "WatchRegistry", "RegisterReplica", "Heartbeat", "DeregisterReplica",
                       "ApplyEndpoints")
_REPLICAS_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "fmapi.quota.v1.QuotaService"},
                 {"service": "fmapi.usage.v1.UsageService"},
                 *({"service": "fmapi.routing.v1.RoutingService", "method": m}
                   for m in _ROUTING_REPEATABLE)],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
})


def target(address: str) -> tuple[str, list[tuple[str, object]]]:
    """The gRPC target and extra options for ``address``: one ``host:port``, or several
    comma-separated (``127.0.0.1:7001,127.0.0.1:7002``: replicas of one service)."""
    if "," not in address:
        return address, []
    bad = [a for a in address.split(",") if not _IPV4_PORT.fullmatch(a.strip())]
    if bad:
        raise ValueError(f"several replicas must be IPv4 host:port pairs, not {bad} (one name "
                         "resolving to every replica, e.g. a headless Service, is one address)")
    # A replica that died and came back is dialled again within a second or two (gRPC's
    # default backoff grows to two minutes).
    return "ipv4:" + address, [("grpc.service_config", _REPLICAS_CONFIG),
                               ("grpc.initial_reconnect_backoff_ms", 200),
                               ("grpc.max_reconnect_backoff_ms", 2000)]


def make_channel(address: str, tls: TlsFiles | None, server_name: str) -> grpc.aio.Channel:
    """A channel to ``address`` (one replica, or several comma-separated, balanced), which must
    present a certificate for identity ``server_name`` (ignored when ``tls`` is None: the
    insecure mode of the benchmarks)."""
    address, extra = target(address)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=[*_OPTIONS, *extra],
                                         interceptors=client_interceptors())
    options = [*_OPTIONS, *extra, ("grpc.ssl_target_name_override", server_name)]
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), options=options, interceptors=client_interceptors()
    )


class ChannelPool:
    """Caches one channel per address and identity; channels multiplex every call over HTTP/2."""

    def __init__(self, tls: TlsFiles | None) -> None:
        self._tls = tls
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    def get(self, address: str, server_name: str) -> grpc.aio.Channel:
        key = (address, server_name)
        ch = self._channels.get(key)
        if ch is None:
            ch = self._channels[key] = make_channel(address, self._tls, server_name)
        return ch

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()
