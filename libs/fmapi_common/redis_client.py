"""The one way a service opens its Redis client for shared state (auth, routing, quota)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis.asyncio as aioredis


def make_redis(url: str, *, name: str, timeout: float, max_connections: int,
               subscriber: bool = False, decode_responses: bool = True,
               pool_wait: float | None = None) -> aioredis.Redis:
    """A client that fails fast: one retry (a stale pooled connection; every call it is used for
    is safe to repeat), short timeouts, and a bounded pool that a burst of concurrent calls waits
    for (redis-py's default pool refuses past 100 connections, which turned bursts into 503s).

    ``pool_wait``: how long a call waits for a free connection when all are busy (default
    ``timeout``): a busy pool is load, not Redis failing, so a service facing bursts waits longer
    for a connection than it waits for Redis' answer.

    ``subscriber``: for a pub/sub connection, which blocks on reads (no read timeout, no retry:
    a dropped connection still ends its read at once)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout if pool_wait is None else pool_wait,
        decode_responses=decode_responses,
        socket_connect_timeout=timeout,
        socket_timeout=None if subscriber else timeout,
        retry=Retry(NoBackoff(), 0 if subscriber else 1),
        client_name=f"fmapi-{name}",
    )
    pool.connection_class = _packing_in_c(pool.connection_class)
    return aioredis.Redis.from_pool(pool)


@functools.cache
def _packing_in_c(connection_class: type) -> type:
    """``connection_class`` (plain, TLS or Unix socket, as the URL chose), packing commands with
    hiredis as redis-py's synchronous client does. Its asyncio client packs them in Python,
    argument by argument: a quota script's 30-odd arguments cost more to pack than Redis takes
    to run the script (``make bench quota``)."""
    from redis.connection import HiredisRespSerializer
    from redis.utils import HIREDIS_AVAILABLE

    if not HIREDIS_AVAILABLE:
        return connection_class
    serializer = HiredisRespSerializer()

    class Connection(connection_class):
        def pack_command(self, *args):
            return serializer.pack(*args)

    Connection.__name__ = Connection.__qualname__ = f"Hiredis{connection_class.__name__}"
    return Connection
