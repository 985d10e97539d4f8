"""API tokens: their format, their hash, and the Redis store that holds them (no gRPC here).

A secret is ``fmapi_`` + 43 base62 characters (256 random bits) + a 6-character base62 CRC-32 of
those 43 characters, so a mistyped or truncated token is refused without a Redis lookup and secret
scanners can recognise fmapi tokens. Only SHA-256(secret) is stored (a 256-bit random secret needs
no salt or slow hash); the secret itself is returned once by :meth:`TokenStore.create` and never
stored, logged or returned again.

Redis layout (``ns`` is ``fmapi:auth`` by default)::

    {ns}:token:{sha256 hex}  hash: the token's metadata (TokenRecord fields) - looked up per request
    {ns}:id:{token id}       string: the sha256 hex, for revoke and list
    {ns}:ids                 set of token ids
    {ns}:admins              set of admin token ids
    {ns}:revoked             pub/sub channel: ids of revoked tokens
    {ns}:bootstrap-lock      short-lived lock while one replica creates the bootstrap admin token

Tokens with an expiry get a Redis expiry on both keys a day after they expire (so a caller still
hears "expired" rather than "unknown" for a while); the ``ids``/``admins`` sets are pruned lazily
when they name a token that is gone.

Every auth replica keeps a small cache of looked-up tokens. An entry lives at most ``cache_ttl``
seconds (at most 1 s), is dropped at once when a revocation is published, and the whole cache is
off while the replica is not subscribed to the revocation channel (Redis down or reconnecting),
so revocation reaches every replica within a second and a lost Redis fails closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import string
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from fmapi_common import tasks
from fmapi_common.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable
from fmapi_common.identity import Identity

log = logging.getLogger(__name__)

TOKEN_PREFIX = "fmapi_"
_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
_BODY_LEN = 43  # 62**43 > 2**256
_CHECK_LEN = 6  # 62**6 > 2**32
SECRET_LEN = len(TOKEN_PREFIX) + _BODY_LEN + _CHECK_LEN
_SECRET_RE = re.compile(rf"^{TOKEN_PREFIX}[0-9A-Za-z]{{{_BODY_LEN + _CHECK_LEN}}}$")
_VISIBLE = 4  # characters after the prefix shown in listings

NAME_RE = re.compile(r"^[A-Za-z0-9._@+=-]{1,128}$")
SCOPE_RE = re.compile(r"^[A-Za-z0-9._:*?!\[\]-]{1,128}$")
MAX_SCOPES = 100
MAX_COMMENT = 256
MAX_LIFETIME = 10 * 365 * 86400
PRINCIPAL_KINDS = ("user", "service_principal")
# How long an expired token's record stays in Redis (listing hides it; Check says "expired").
EXPIRED_RETENTION = 86400


# ---------------------------------------------------------------- format


def _b62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    if n:
        raise ValueError("number too large for width")
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _b62(zlib.crc32(body.encode("ascii")), _CHECK_LEN)


def generate_secret() -> str:
    """A new secret: ``fmapi_`` + 256 random bits in base62 + a CRC-32 check."""
    body = _b62(int.from_bytes(secrets.token_bytes(32), "big"), _BODY_LEN)
    return TOKEN_PREFIX + body + _checksum(body)


def is_well_formed(secret: str) -> bool:
    """Whether ``secret`` has the fmapi token shape and a valid checksum."""
    if not isinstance(secret, str) or not _SECRET_RE.match(secret):
        return False
    body = secret[len(TOKEN_PREFIX) : len(TOKEN_PREFIX) + _BODY_LEN]
    return hmac.compare_digest(_checksum(body), secret[-_CHECK_LEN:])


def hash_secret(secret: str) -> str:
    """SHA-256 hex of the secret: its only stored form."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def display_prefix(secret: str) -> str:
    return secret[: len(TOKEN_PREFIX) + _VISIBLE]


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class TokenRecord:
    """A token's metadata (never its secret)."""

    id: str
    name: str
    principal: str
    principal_kind: str
    workspace: str
    endpoints: tuple[str, ...]
    admin: bool
    created: float
    expires: float | None
    last_used: float | None
    prefix: str
    sha256: str

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def identity(self) -> Identity:
        return Identity(
            principal=self.principal,
            workspace=self.workspace,
            token_id=self.id,
            scopes=self.endpoints,
            admin=self.admin,
            principal_kind=self.principal_kind,
        )

    def to_hash(self) -> dict[str, str]:
        return {
            "id": self.id,
            "name": self.name,
            "principal": self.principal,
            "principal_kind": self.principal_kind,
            "workspace": self.workspace,
            "endpoints": json.dumps(list(self.endpoints), separators=(",", ":")),
            "admin": "1" if self.admin else "0",
            "created": repr(self.created),
            "expires": "" if self.expires is None else repr(self.expires),
            "last_used": "" if self.last_used is None else repr(self.last_used),
            "prefix": self.prefix,
            "sha256": self.sha256,
        }

    @classmethod
    def from_hash(cls, h: dict) -> TokenRecord:
        d = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in h.items()
        }
        return cls(
            id=d["id"],
            name=d.get("name", ""),
            principal=d["principal"],
            principal_kind=d.get("principal_kind", "user"),
            workspace=d["workspace"],
            endpoints=tuple(json.loads(d.get("endpoints") or "[]")),
            admin=d.get("admin") == "1",
            created=float(d["created"]),
            expires=float(d["expires"]) if d.get("expires") else None,
            last_used=float(d["last_used"]) if d.get("last_used") else None,
            prefix=d.get("prefix", ""),
            sha256=d["sha256"],
        )


def validate_new_token(
    *,
    name: str,
    principal: str,
    principal_kind: str,
    workspace: str,
    endpoints: tuple[str, ...] | list[str],
    lifetime_seconds: float,
) -> None:
    if len(name) > MAX_COMMENT or any(ord(c) < 32 for c in name):
        raise InvalidArgument(
            f"token name must be at most {MAX_COMMENT} printable characters", param="name"
        )
    if not NAME_RE.match(principal or ""):
        raise InvalidArgument(
            "principal must be 1-128 characters of letters, digits and . _ @ + = -",
            param="owner.id",
        )
    if principal_kind not in PRINCIPAL_KINDS:
        raise InvalidArgument(
            f"principal kind must be one of {', '.join(PRINCIPAL_KINDS)}", param="owner.kind"
        )
    if not NAME_RE.match(workspace or ""):
        raise InvalidArgument(
            "workspace must be 1-128 characters of letters, digits and . _ @ + = -",
            param="owner.workspace",
        )
    if len(endpoints) > MAX_SCOPES:
        raise InvalidArgument(f"at most {MAX_SCOPES} endpoint scopes", param="scopes.endpoints")
    for e in endpoints:
        if not SCOPE_RE.match(e):
            raise InvalidArgument(
                f"bad endpoint scope {e!r}: an endpoint name or glob pattern "
                "(letters, digits, . _ : - and * ? [ ] !)",
                param="scopes.endpoints",
            )
    if lifetime_seconds < 0 or lifetime_seconds > MAX_LIFETIME:
        raise InvalidArgument(
            f"lifetime_seconds must be between 0 (no expiry) and {MAX_LIFETIME}",
            param="lifetime_seconds",
        )


# ---------------------------------------------------------------- store


@contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise Unavailable(
            f"token store unavailable (Redis): {type(exc).__name__}: {exc}", retry_after=1.0
        ) from None


@dataclass
class _CacheEntry:
    record: TokenRecord
    until: float  # monotonic


# Set last_used only while the token still exists (a revoked token must not come back as a stub).
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'last_used', ARGV[1])
  return 1
end
return 0
"""


class TokenStore:
    """Tokens in Redis, with a per-replica cache that revocation clears within a second."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        pubsub_redis: aioredis.Redis | None = None,
        namespace: str = "fmapi:auth",
        cache_ttl: float = 1.0,
        cache_size: int = 10_000,
        last_used_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= cache_ttl <= 1.0:
            raise ValueError("cache_ttl must be between 0 and 1 second")
        self._redis = redis
        self._pubsub_redis = pubsub_redis or redis
        self._ns = namespace
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._last_used_interval = last_used_interval
        self._clock = clock
        self._cache: dict[str, _CacheEntry] = {}
        self._cache_ids: dict[str, str] = {}  # token id -> sha
        self._cache_live = False  # only while subscribed to revocations
        self._generation = 0  # bumped by every invalidation
        self._touched: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._lookups: dict[str, asyncio.Task] = {}  # sha -> the Redis lookup in flight
        self._listener: asyncio.Task | None = None
        self._subscribed = asyncio.Event()
        self._touch_script = redis.register_script(_TOUCH)

    # keys
    def _token_key(self, sha: str) -> str:
        return f"{self._ns}:token:{sha}"

    def _id_key(self, token_id: str) -> str:
        return f"{self._ns}:id:{token_id}"

    @property
    def _ids_key(self) -> str:
        return f"{self._ns}:ids"

    @property
    def _admins_key(self) -> str:
        return f"{self._ns}:admins"

    @property
    def channel(self) -> str:
        return f"{self._ns}:revoked"

    # lifecycle
    async def start(self) -> None:
        if self._cache_ttl > 0 and self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="auth-revocations")

    async def wait_subscribed(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._subscribed.wait()
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        await tasks.stop(self._listener, *self._tasks)
        self._listener = None
        await self._redis.aclose()
        if self._pubsub_redis is not self._redis:
            await self._pubsub_redis.aclose()

    # cache
    def _invalidate(self, token_id: str) -> None:
        self._generation += 1
        sha = self._cache_ids.pop(token_id, None)
        if sha:
            self._cache.pop(sha, None)
        self._touched.pop(token_id, None)

    def _disable_cache(self) -> None:
        self._cache_live = False
        self._subscribed.clear()
        self._generation += 1
        self._cache.clear()
        self._cache_ids.clear()

    def _cache_put(self, rec: TokenRecord, generation: int) -> None:
        if not self._cache_live or self._cache_ttl <= 0 or generation != self._generation:
            return
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
            self._cache_ids.clear()
        self._cache[rec.sha256] = _CacheEntry(rec, time.monotonic() + self._cache_ttl)
        self._cache_ids[rec.id] = rec.sha256

    def _cache_get(self, sha: str) -> TokenRecord | None:
        if not self._cache_live:
            return None
        entry = self._cache.get(sha)
        if entry is None:
            return None
        if entry.until <= time.monotonic():
            self._cache.pop(sha, None)
            self._cache_ids.pop(entry.record.id, None)
            return None
        return entry.record

    async def _listen(self) -> None:
        delay = 0.05
        while True:
            pubsub = self._pubsub_redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                # Anything cached before now may have missed a revocation: start empty.
                self._cache.clear()
                self._cache_ids.clear()
                self._generation += 1
                self._cache_live = True
                self._subscribed.set()
                delay = 0.05
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    data = msg.get("data")
                    token_id = data.decode() if isinstance(data, bytes) else str(data)
                    self._invalidate(token_id)
            except asyncio.CancelledError:
                self._disable_cache()
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: cache off, resubscribe
                if self._cache_live:
                    log.warning("revocation channel lost (%s); token cache off", exc)
                self._disable_cache()
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass
            self._disable_cache()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    # operations
    async def create(
        self,
        *,
        name: str = "",
        principal: str,
        principal_kind: str = "user",
        workspace: str = "default",
        endpoints: tuple[str, ...] | list[str] = (),
        admin: bool = False,
        lifetime_seconds: float = 0,
    ) -> tuple[str, TokenRecord]:
        """Create a token; returns ``(secret, record)``. The secret exists nowhere else."""
        endpoints = tuple(endpoints)
        validate_new_token(
            name=name,
            principal=principal,
            principal_kind=principal_kind,
            workspace=workspace,
            endpoints=endpoints,
            lifetime_seconds=lifetime_seconds,
        )
        secret = generate_secret()
        sha = hash_secret(secret)
        now = self._clock()
        rec = TokenRecord(
            id=secrets.token_hex(10),
            name=name,
            principal=principal,
            principal_kind=principal_kind,
            workspace=workspace,
            endpoints=endpoints,
            admin=admin,
            created=now,
            expires=now + lifetime_seconds if lifetime_seconds else None,
            last_used=None,
            prefix=display_prefix(secret),
            sha256=sha,
        )
        with _redis_errors():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(self._token_key(sha), mapping=rec.to_hash())
            pipe.set(self._id_key(rec.id), sha)
            pipe.sadd(self._ids_key, rec.id)
            if admin:
                pipe.sadd(self._admins_key, rec.id)
            if rec.expires is not None:
                at_ms = int((rec.expires + EXPIRED_RETENTION) * 1000)
                pipe.pexpireat(self._token_key(sha), at_ms)
                pipe.pexpireat(self._id_key(rec.id), at_ms)
            await pipe.execute()
        log.info(
            "created token %s for %s/%s (admin=%s, endpoints=%s, expires=%s)",
            rec.id,
            workspace,
            principal,
            admin,
            list(endpoints),
            rec.expires,
        )
        return secret, rec

    async def _records(self, ids: list[str]) -> tuple[list[TokenRecord], list[str]]:
        """Records for ``ids`` and the ids that no longer exist."""
        if not ids:
            return [], []
        pipe = self._redis.pipeline(transaction=False)
        for i in ids:
            pipe.get(self._id_key(i))
        shas = await pipe.execute()
        pipe = self._redis.pipeline(transaction=False)
        live = [(i, s.decode() if isinstance(s, bytes) else s) for i, s in zip(ids, shas) if s]
        for _, s in live:
            pipe.hgetall(self._token_key(s))
        hashes = await pipe.execute() if live else []
        now = self._clock()
        records, gone = [], [i for i, s in zip(ids, shas) if not s]
        for (i, _), h in zip(live, hashes):
            if not h:
                gone.append(i)
                continue
            rec = TokenRecord.from_hash(h)
            if rec.expired(now):
                continue
            records.append(rec)
        return records, gone

    async def list(self, *, owner_id: str = "", workspace: str = "") -> list[TokenRecord]:
        with _redis_errors():
            ids = sorted(m.decode() if isinstance(m, bytes) else m
                         for m in await self._redis.smembers(self._ids_key))
            records, gone = await self._records(ids)
            if gone:
                await self._redis.srem(self._ids_key, *gone)
                await self._redis.srem(self._admins_key, *gone)
        out = [
            r
            for r in records
            if (not owner_id or r.principal == owner_id)
            and (not workspace or r.workspace == workspace)
        ]
        out.sort(key=lambda r: (r.created, r.id))
        return out

    async def get(self, token_id: str) -> TokenRecord:
        with _redis_errors():
            records, _ = await self._records([token_id])
        if not records:
            raise NotFound(f"token {token_id!r} does not exist", param="token_id")
        return records[0]

    async def revoke(self, token_id: str) -> TokenRecord:
        """Delete a token everywhere and tell every replica to drop it from its cache."""
        if not token_id:
            raise InvalidArgument("token id is required", param="token_id")
        with _redis_errors():
            sha = await self._redis.get(self._id_key(token_id))
            if not sha:
                raise NotFound(f"token {token_id!r} does not exist", param="token_id")
            sha = sha.decode() if isinstance(sha, bytes) else sha
            h = await self._redis.hgetall(self._token_key(sha))
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self._token_key(sha), self._id_key(token_id))
            pipe.srem(self._ids_key, token_id)
            pipe.srem(self._admins_key, token_id)
            pipe.publish(self.channel, token_id)
            await pipe.execute()
        self._invalidate(token_id)
        log.info("revoked token %s", token_id)
        if h:
            return TokenRecord.from_hash(h)
        raise NotFound(f"token {token_id!r} does not exist", param="token_id")

    async def authenticate(self, secret: str) -> TokenRecord:
        """The live token a presented secret belongs to.

        Raises :class:`Unauthenticated` (malformed, unknown, revoked, expired) or
        :class:`Unavailable` (Redis unreachable: fail closed).
        """
        sha = hash_secret(secret)
        rec = self._cache_get(sha)
        if rec is None:
            # (A cached hit is a token this replica looked up, so necessarily well formed; the
            # shape and checksum are checked before anything goes to Redis.)
            if not is_well_formed(secret):
                raise Unauthenticated("malformed API token: expected an fmapi_... token")
            # Concurrent requests with the same token share one Redis lookup.
            lookup = self._lookups.get(sha)
            if lookup is None:
                lookup = asyncio.get_running_loop().create_task(self._lookup(sha))
                self._lookups[sha] = lookup
                lookup.add_done_callback(lambda t, sha=sha: self._lookup_done(sha, t))
            rec = await asyncio.shield(lookup)
            if rec is None:
                raise Unauthenticated("invalid API token: unknown or revoked")
        now = self._clock()
        if rec.expired(now):
            raise Unauthenticated("API token expired")
        self._maybe_touch(rec, now)
        return rec

    def _lookup_done(self, sha: str, task: asyncio.Task) -> None:
        self._lookups.pop(sha, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, so a lookup nobody awaits any more is quiet

    async def _lookup(self, sha: str) -> TokenRecord | None:
        generation = self._generation
        with _redis_errors():
            h = await self._redis.hgetall(self._token_key(sha))
        if not h:
            return None
        rec = TokenRecord.from_hash(h)
        if not hmac.compare_digest(rec.sha256, sha):  # a record filed under the wrong key
            return None
        self._cache_put(rec, generation)
        return rec

    # last_used, cheaply: at most once per interval per token per replica, off the request path
    def _maybe_touch(self, rec: TokenRecord, now: float) -> None:
        last = self._touched.get(rec.id)
        if last is not None and now - last < self._last_used_interval:
            return
        if len(self._touched) > 100_000:
            self._touched.clear()
        self._touched[rec.id] = now
        task = asyncio.get_running_loop().create_task(self._touch(rec.sha256, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _touch(self, sha: str, now: float) -> None:
        try:
            await self._touch_script(keys=[self._token_key(sha)], args=[repr(now)])
        except (RedisError, OSError) as exc:
            log.debug("could not record last use: %s", exc)

    async def flush_touches(self) -> None:
        """Wait for pending last-used writes (tests, shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # bootstrap
    async def has_admin(self) -> bool:
        with _redis_errors():
            ids = [
                m.decode() if isinstance(m, bytes) else m
                for m in await self._redis.smembers(self._admins_key)
            ]
            records, gone = await self._records(ids)
            if gone:
                await self._redis.srem(self._admins_key, *gone)
        return any(r.admin for r in records)

    async def ensure_bootstrap_admin(
        self, path: str, *, principal: str = "admin", workspace: str = "default"
    ) -> str | None:
        """Create an admin token when none exists and write its secret to ``path`` (mode 0600).

        Returns the new token's id, or None when an admin token already exists. Replicas starting
        together agree through a Redis lock: one creates, the others wait for it.
        """
        lock_key = f"{self._ns}:bootstrap-lock"
        me = secrets.token_hex(8)
        deadline = time.monotonic() + 30
        with _redis_errors():
            while not await self._redis.set(lock_key, me, nx=True, px=30_000):
                if time.monotonic() > deadline:
                    raise Unavailable("timed out waiting for another replica's bootstrap")
                await asyncio.sleep(0.1)
        try:
            if await self.has_admin():
                log.info("an admin token exists; not creating a bootstrap token")
                if not os.path.exists(path):
                    log.warning(
                        "bootstrap token file %s is missing but an admin token exists; "
                        "revoke the admin tokens to have a new one written",
                        path,
                    )
                return None
            secret, rec = await self.create(
                name="bootstrap admin token",
                principal=principal,
                workspace=workspace,
                endpoints=("*",),
                admin=True,
            )
            try:
                write_secret_file(path, secret)
            except OSError:
                await self.revoke(rec.id)
                raise
            log.info("created bootstrap admin token %s; its secret is in %s", rec.id, path)
            return rec.id
        finally:
            try:
                if await self._redis.get(lock_key) in (me, me.encode()):
                    await self._redis.delete(lock_key)
            except (RedisError, OSError):
                pass


def write_secret_file(path: str, secret: str) -> None:
    """Write ``secret`` to ``path`` atomically, readable by the owner only (0600)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secret + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
