"""The replica registry, kept in Redis so every routing replica sees the same one.

``fmapi:replica:<id>`` is a hash (address, kind, models, inflight, dedicated endpoint, owner) that
expires ``ttl`` seconds after the last heartbeat; ``fmapi:model:<model>`` is a sorted set of
replica ids scored by their expiry time, so a dead replica drops out on its own.

Registrations are bound to the identity that made them (the model server's certificate): ids are
assigned here, never chosen by the caller, and only the owner may renew or remove its replica.
TTL, reported load, address and model names are validated (:func:`check_registration`).

Every change (a registration, a departure, a heartbeat that reports a new load) is published on
the registry's change channel (every routing replica rebuilds the view it streams to gateways);
a heartbeat that only renews the lease is not a change. Every model ever registered is remembered
with its kind (``fmapi:registry:models``: the models an endpoint may name).
"""

from __future__ import annotations

import functools
import json
import re
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio as redis
from redis.exceptions import RedisError

from fmapi_common.errors import InvalidArgument, PermissionDenied, Unavailable

from .registry import CHANNEL, LOAD_MESSAGE, MODELS

_PREFIX = "fmapi:"

# Drops expired members, then returns id, address, inflight, dedicated endpoint of the rest.
_LIVE_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for _, id in ipairs(ids) do
  local h = redis.call('HMGET', ARGV[2] .. id, 'address', 'inflight', 'dedicated_endpoint')
  if h[1] then
    table.insert(out, id); table.insert(out, h[1]); table.insert(out, h[2] or '0')
    table.insert(out, h[3] or '')
  end
end
return out
"""


@dataclass
class ReplicaInfo:
    id: str
    address: str
    kind: int = 0
    models: list[str] = field(default_factory=list)
    inflight: int = 0
    dedicated_endpoint: str = ""
    last_seen: float = 0.0
    expires_in_ms: int = 0


# Bounds on what a model server may report about itself.
MIN_TTL, MAX_TTL, DEFAULT_TTL = 2.0, 60.0, 10.0
MAX_INFLIGHT = 1_000_000
MAX_MODELS = 32
_ADDRESS = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):(\d{1,5})$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


def check_registration(info: ReplicaInfo, ttl: float) -> None:
    """Refuse a registration that routing could not trust (INVALID_ARGUMENT naming the field)."""
    if info.id:
        raise InvalidArgument("replica ids are assigned by routing; leave 'id' empty", param="replica.id")
    m = _ADDRESS.match(info.address)
    if not m or not 0 < int(m.group(1)) < 65536:
        raise InvalidArgument("'address' must be host:port", param="replica.address")
    if not 1 <= len(info.models) <= MAX_MODELS or not all(_MODEL.match(x) for x in info.models):
        raise InvalidArgument(
            f"a replica serves 1 to {MAX_MODELS} models with valid names", param="replica.models"
        )
    check_inflight(info.inflight)
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidArgument(
            f"'ttl_seconds' must be between {MIN_TTL:g} and {MAX_TTL:g}", param="ttl_seconds"
        )


def check_inflight(inflight: int) -> None:
    if not 0 <= inflight <= MAX_INFLIGHT:
        raise InvalidArgument(f"'inflight' must be between 0 and {MAX_INFLIGHT}", param="inflight")


def _fail_fast(method):
    """Redis unreachable: UNAVAILABLE (a prompt 503 with Retry-After), never a hang or a 500."""

    @functools.wraps(method)
    async def call(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except (RedisError, OSError):
            raise Unavailable("the replica registry (Redis) is unavailable; retry shortly",
                              retry_after=1.0) from None

    return call


class ReplicaStore:
    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self._live = client.register_script(_LIVE_SCRIPT)

    @staticmethod
    def _key(replica_id: str) -> str:
        return f"{_PREFIX}replica:{replica_id}"

    @staticmethod
    def _model_key(model: str) -> str:
        return f"{_PREFIX}model:{model}"

    @_fail_fast
    async def register(self, info: ReplicaInfo, ttl: float, owner: str) -> str:
        """Store a new replica owned by ``owner`` (validate it with :func:`check_registration`)."""
        info.id = uuid.uuid4().hex
        now = time.time()
        key = self._key(info.id)
        async with self._r.pipeline(transaction=True) as p:
            p.hset(
                key,
                mapping={
                    "address": info.address,
                    "kind": info.kind,
                    "models": json.dumps(info.models),
                    "inflight": info.inflight,
                    "dedicated_endpoint": info.dedicated_endpoint,
                    "last_seen": now,
                    "ttl": ttl,
                    "owner": owner,
                },
            )
            p.pexpire(key, int(ttl * 1000))
            for m in info.models:
                p.zadd(self._model_key(m), {info.id: now + ttl})
                p.hset(MODELS, m, info.kind)
            p.publish(CHANNEL, "r")
            await p.execute()
        return info.id

    async def _owned(self, replica_id: str, owner: str) -> tuple[list[str], float, int] | None:
        """The replica's models, TTL and last reported in-flight count; None when unknown;
        PermissionDenied when not ``owner``'s."""
        data = await self._r.hmget(self._key(replica_id), "models", "ttl", "owner", "inflight")
        if data[0] is None:
            return None
        if (data[2] or b"").decode() != owner:
            raise PermissionDenied(f"replica {replica_id} belongs to another service", param="id")
        return json.loads(data[0]), float(data[1]), int(data[3] or 0)

    @_fail_fast
    async def heartbeat(self, replica_id: str, inflight: int, owner: str) -> bool:
        check_inflight(inflight)
        key = self._key(replica_id)
        owned = await self._owned(replica_id, owner)
        if owned is None:
            return False
        models, ttl, before = owned
        now = time.time()
        async with self._r.pipeline(transaction=True) as p:
            p.hset(key, mapping={"inflight": inflight, "last_seen": now})
            p.pexpire(key, int(ttl * 1000))
            for m in models:
                p.zadd(self._model_key(m), {replica_id: now + ttl})
            if inflight != before:
                # Only a new load is news, and only load news (routing views send it on at
                # most once a second): a beat that renews the lease alone changes nothing a
                # routing view holds (an idle fleet's beats wake no routing replica).
                p.publish(CHANNEL, LOAD_MESSAGE)
            await p.execute()
        return True

    @_fail_fast
    async def deregister(self, replica_id: str, owner: str) -> None:
        key = self._key(replica_id)
        owned = await self._owned(replica_id, owner)
        if owned is None:
            return
        async with self._r.pipeline(transaction=True) as p:
            p.delete(key)
            for m in owned[0]:
                p.zrem(self._model_key(m), replica_id)
            p.publish(CHANNEL, "r")
            await p.execute()

    @_fail_fast
    async def live_for_model(self, model: str) -> list[ReplicaInfo]:
        flat = await self._live(keys=[self._model_key(model)], args=[time.time(), f"{_PREFIX}replica:"])
        out = []
        for i in range(0, len(flat), 4):
            rid, addr, inflight, dedicated = (
                v.decode() if isinstance(v, bytes) else str(v) for v in flat[i : i + 4]
            )
            out.append(ReplicaInfo(rid, addr, models=[model], inflight=int(inflight), dedicated_endpoint=dedicated))
        return out

    @_fail_fast
    async def all_live(self) -> list[ReplicaInfo]:
        keys = [k async for k in self._r.scan_iter(match=f"{_PREFIX}replica:*", count=500)]
        async with self._r.pipeline(transaction=False) as p:
            for key in keys:
                p.hgetall(key)
            found = await p.execute()
        now = time.time()
        out = []
        for key, h in zip(keys, found):
            if not h:
                continue
            h = {k.decode(): v.decode() for k, v in h.items()}
            last_seen = float(h.get("last_seen", 0))
            expires_in_ms = int((last_seen + float(h.get("ttl", DEFAULT_TTL)) - now) * 1000)
            if expires_in_ms <= 0:
                continue
            out.append(
                ReplicaInfo(
                    id=key.decode().rsplit(":", 1)[1],
                    address=h["address"],
                    kind=int(h.get("kind", 0)),
                    models=json.loads(h.get("models", "[]")),
                    inflight=int(h.get("inflight", 0)),
                    dedicated_endpoint=h.get("dedicated_endpoint", ""),
                    last_seen=last_seen,
                    expires_in_ms=expires_in_ms,
                )
            )
        return out
