"""Each routing replica's view of the registry, rebuilt from Redis on every change, and handed to
every gateway that watches it.

A change anywhere (an endpoint written by any routing replica; a replica registering, reporting a
new load or leaving) is published on ``fmapi:registry:changes``; every routing replica rebuilds its
view at once (changes arriving together are coalesced), and at least every ``refresh_s`` seconds
(replicas that stopped beating drop out; a missed message costs at most that long). After its
subscription drops, a replica reloads as soon as it is back. Each rebuild also promotes pending
configs whose models have come up. Watchers get a new message only when a rebuild changed what
they act on (the leases' countdowns aside), one whose only news is replicas' load at most every
``load_update_s``, and the current one as a keep-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

import prometheus_client
import redis.asyncio as redis

from fmapi.routing.v1 import routing_pb2 as pb
from fmapi_common.endpoints import Endpoint, to_pb
from fmapi_common import tasks
from fmapi_common.errors import FmapiError
from fmapi_common.router import View

from .registry import CHANNEL, LOAD_MESSAGE, ControlPlane, RegistryStore
from .replicas import ReplicaStore

log = logging.getLogger(__name__)

LOAD_MESSAGES = (LOAD_MESSAGE, LOAD_MESSAGE.encode())


class RegistryView:
    def __init__(self, store: RegistryStore, replicas: ReplicaStore, subscriber: redis.Redis, *,
                 static_replicas: dict[str, list[str]] | None = None, refresh_s: float = 1.0,
                 pending_timeout_s: float = 600.0, coalesce_s: float = 0.02,
                 load_update_s: float = 1.0) -> None:
        self._store = store
        self._replicas = replicas
        self._sub = subscriber
        self._static = {m: pb.StaticReplicas(addresses=a) for m, a in (static_replicas or {}).items()}
        self._refresh_s = refresh_s
        self._pending_timeout_ms = int(pending_timeout_s * 1000)
        self._coalesce_s = coalesce_s
        self._load_update_s = load_update_s
        self.control: ControlPlane | None = None
        self.current = View()
        self.message = pb.WatchRegistryResponse(version=-1)
        self.seq = 0  # bumped whenever what watchers act on changes
        self._dirty = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.closing = False
        self._cache: dict[str, pb.Endpoint] = {}
        # The last message sent to watchers, leases' countdowns left out; the same without the
        # replicas' loads; when it was sent (monotonic seconds).
        self._content = b""
        self._shape = b""
        self._sent_at = float("-inf")
        self._load_timer: asyncio.TimerHandle | None = None

    def live_models(self) -> set[str]:
        return self.current.live_models()

    async def start(self) -> None:
        try:
            await self.rebuild()
        except FmapiError as exc:
            log.warning("registry not loaded at start (%s); retrying", exc.message)
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._rebuilder())]

    async def drain(self) -> None:
        """Shutting down: end every watch stream now (gateways reconnect to another replica)."""
        self.closing = True
        self._changed.set()

    async def stop(self) -> None:
        if self._load_timer is not None:
            self._load_timer.cancel()
        await tasks.stop(*self._tasks)

    def poke(self) -> None:
        """Something changed: rebuild soon."""
        self._dirty.set()

    def _load_due(self) -> None:
        """News of load held back: its time has come."""
        self._load_timer = None
        self._dirty.set()

    def _load_news(self) -> None:
        """A replica reported a new load: rebuild once watchers may be sent load news again
        (a busy fleet's beats cost one rebuild per load_update_s, not one each)."""
        if self._load_timer is not None:
            return
        wait = self._sent_at + self._load_update_s - time.monotonic()
        if wait <= 0:
            self._dirty.set()
        else:
            self._load_timer = asyncio.get_running_loop().call_later(wait, self._load_due)

    async def rebuild(self) -> None:
        version, raw = await self._store.snapshot()
        # Each stored version is parsed once (rebuilds follow every replica's heartbeats).
        self._cache = {j: self._cache.get(j) or to_pb(Endpoint.model_validate_json(j))
                       for j in raw.values()}
        endpoints = [self._cache[j] for _, j in sorted(raw.items())]
        live = await self._replicas.all_live()
        msg = pb.WatchRegistryResponse(version=version, endpoints=endpoints,
                                       static_replicas=self._static)
        live.sort(key=lambda r: r.id)
        for r in live:
            msg.replicas.add(id=r.id, address=r.address, kind=r.kind, models=r.models,
                             dedicated_endpoint=r.dedicated_endpoint)
        # What a watcher acts on, without the replicas' loads, then with them; never the leases'
        # countdowns (different on every rebuild).
        shape = msg.SerializeToString(deterministic=True)
        for entry, r in zip(msg.replicas, live):
            entry.inflight = r.inflight
        content = msg.SerializeToString(deterministic=True)
        for entry, r in zip(msg.replicas, live):
            entry.expires_in_ms = r.expires_in_ms
        self.current = View.of(msg)
        self.message = msg
        # Watchers are woken only when something they act on changed (an idle registry,
        # refreshed every second, costs them nothing: their keep-alive brings the countdowns),
        # and for news of load alone at most every load_update_s (a rebuild then sends what is
        # still new).
        now = time.monotonic()
        if content != self._content:
            wait = 0.0 if shape != self._shape else self._sent_at + self._load_update_s - now
            if wait <= 0:
                self._content, self._shape, self._sent_at = content, shape, now
                _count_replicas(msg)
                self.seq += 1
                changed, self._changed = self._changed, asyncio.Event()
                changed.set()
            elif self._load_timer is None:
                self._load_timer = asyncio.get_running_loop().call_later(wait, self._load_due)
        if self.control is not None and any(
                e.config_update == pb.CONFIG_UPDATE_STATE_IN_PROGRESS for e in endpoints):
            await self.control.promote(self.live_models(), self._pending_timeout_ms)

    async def wait_newer(self, seq: int, timeout: float) -> None:
        """Return once a message newer than ``seq`` exists, or after ``timeout``."""
        if self.seq != seq:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    async def _rebuilder(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._refresh_s):
                    await self._dirty.wait()
            await asyncio.sleep(self._coalesce_s)  # let changes that arrive together coalesce
            self._dirty.clear()
            try:
                await self.rebuild()
            except FmapiError as exc:
                log.warning("registry rebuild failed: %s", exc.message)
            except Exception:  # noqa: BLE001 - keep the last good view, try again
                log.exception("registry rebuild failed")

    async def _listen(self) -> None:
        delay = 0.05
        while True:
            pubsub = self._sub.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self.poke()  # messages may have been missed while unsubscribed: reload
                delay = 0.05
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    if msg.get("data") in LOAD_MESSAGES:
                        self._load_news()
                    else:
                        self.poke()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - resubscribe; the periodic rebuild covers
                log.warning("registry change channel lost (%s); resubscribing", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


REPLICAS = prometheus_client.Gauge(
    "fmapi_model_replicas", "Live replicas per model (0: an endpoint names it and none is live)",
    ["model"])


def _count_replicas(msg: pb.WatchRegistryResponse) -> None:
    """Every model an endpoint names or a replica serves, with its live replicas."""
    counts = Counter(m for r in msg.replicas for m in r.models)
    for model, static in msg.static_replicas.items():
        counts[model] += len(static.addresses)
    for e in msg.endpoints:
        for se in (*e.served_entities, *e.pending_served_entities):
            counts.setdefault(se.model, 0)
    for labels in list(REPLICAS._metrics):  # models no longer named or served
        if labels[0] not in counts:
            REPLICAS.remove(*labels)
    for model, n in counts.items():
        REPLICAS.labels(model).set(n)
