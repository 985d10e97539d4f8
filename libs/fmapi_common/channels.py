"""gRPC client channels: mutual TLS, traced, size-limited, one per address."""

from __future__ import annotations

import grpc

from .telemetry import client_interceptors
from .tls import TlsFiles

_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 1),
]


def make_channel(address: str, tls: TlsFiles | None, server_name: str) -> grpc.aio.Channel:
    """A channel to ``address``, which must present a certificate for identity ``server_name``
    (ignored when ``tls`` is None: the insecure mode of the benchmarks)."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=_OPTIONS, interceptors=client_interceptors())
    options = [*_OPTIONS, ("grpc.ssl_target_name_override", server_name)]
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
