"""The usage writer: drains the quota service's usage streams into SQL, exactly once.

Every writer reads the streams (``<prefix>:{<endpoint>}:usage``, one per endpoint, listed in
``<prefix>:endpoints``) through one consumer group, so writers running at once split the records
between them. A batch is inserted in one transaction, idempotently (the request id is the
primary key), and only then acknowledged and deleted from Redis: a writer that dies between the
insert and the acknowledgement leaves the records pending: restarted under the same consumer
name (``FMAPI_USAGE_CONSUMER``, the replica's name under ``fmapi dev up``) it re-reads its own
pending records first, before any new one; otherwise another writer claims them after
``claim_idle_seconds``. Either way they are inserted again and the primary key absorbs the
duplicates. While the database is unreachable the batch is retried with backoff and everything
else waits in Redis; the writer reports NOT_SERVING and says how many records are waiting.

A record carrying a payload (the request was sampled for its endpoint's inference table) also
becomes a row of that endpoint's table, in the same transaction's batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime

import prometheus_client
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from fmapi_common.endpoints import REGISTRY_KEY

from .db import DatabaseUnavailable, UsageDB

log = logging.getLogger(__name__)

REGISTRY = REGISTRY_KEY


BACKLOG = prometheus_client.Gauge(
    "fmapi_usage_backlog", "Usage records waiting in Redis for a writer (every endpoint's stream)")
ROWS_WRITTEN = prometheus_client.Counter("fmapi_usage_rows_written", "Usage rows inserted in SQL")


def _utc(ms: str | float) -> datetime:
    return datetime.fromtimestamp(float(ms) / 1000, tz=UTC)


def _int(fields: dict[str, str], key: str) -> int:
    try:
        return int(float(fields.get(key) or 0))
    except ValueError:
        return 0


def usage_row(f: dict[str, str]) -> dict:
    """One usage record (stream fields) as an ``endpoint_usage`` row."""
    ttft = _int(f, "ttft_ms")
    return {
        "request_id": f["request_id"],
        "client_request_id": f.get("client_request_id", ""),
        "requester": f.get("principal", ""),
        "requester_kind": f.get("principal_kind", ""),
        "token_id": f.get("token_id", ""),
        "workspace": f.get("workspace", ""),
        "endpoint_name": f.get("endpoint", ""),
        "served_entity": f.get("served_model", ""),
        "request_time": _utc(f.get("start_ms") or 0),
        "status_code": _int(f, "status_code"),
        "input_token_count": _int(f, "input_tokens"),
        "output_token_count": _int(f, "output_tokens"),
        "input_character_count": _int(f, "input_characters"),
        "output_character_count": _int(f, "output_characters"),
        "request_streaming": f.get("streaming") == "1",
        "duration_ms": _int(f, "duration_ms"),
        "time_to_first_token_ms": ttft or None,
        "usage_context": f.get("usage_context") or "{}",
        "finish_reason": f.get("finish_reason", ""),
        "settled_by_lease": f.get("expired") == "1",
    }


def payload_row(f: dict[str, str]) -> dict | None:
    """The record's inference-table row, when it carries a payload."""
    if "payload_request" not in f:
        return None
    return {
        "request_id": f["request_id"],
        "client_request_id": f.get("client_request_id", ""),
        "request_time": _utc(f.get("start_ms") or 0),
        "status_code": _int(f, "status_code"),
        "execution_time_ms": _int(f, "duration_ms"),
        "served_entity": f.get("served_model", ""),
        "requester": f.get("principal", ""),
        "request": f.get("payload_request") or None,
        "response": f.get("payload_response") or None,
        "logging_error_codes": f.get("payload_errors", ""),
        "sampling_fraction": float(f.get("payload_sampling") or 1.0),
    }


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class UsageWriter:
    def __init__(self, redis: aioredis.Redis, db: UsageDB, *, key_prefix: str = "fmapi:quota",
                 group: str = "fmapi-usage-writer", consumer: str | None = None,
                 batch_size: int = 500, block_ms: int = 500, linger_ms: int = 0,
                 claim_idle_seconds: float = 30.0,
                 backlog_alarm: int = 100_000, entities_interval: float = 5.0,
                 on_health: Callable[[bool], object] | None = None) -> None:
        self._r = redis
        self._db = db
        self._prefix = key_prefix
        self._group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._batch = batch_size
        self._block_ms = block_ms
        self._linger = linger_ms / 1000
        self._claim_idle_ms = int(claim_idle_seconds * 1000)
        self._backlog_alarm = backlog_alarm
        self._entities_interval = entities_interval
        self._on_health = on_health
        self._grouped: set[str] = set()
        # Streams whose records this consumer had read and not acknowledged (before a restart)
        # have been re-read and written.
        self._recovered: set[str] = set()
        self._tables: dict[str, str] = {}  # endpoint -> its inference table
        self.healthy = True
        self._db_ok = True
        self._backlog_over = False
        self._backlog_at = 0.0
        self.written = 0
        self._claimed_at = 0.0
        self._entities_at = 0.0
        self._alarm_at = 0.0

    # ------------------------------------------------------------------ streams

    def stream(self, endpoint: str) -> str:
        return f"{self._prefix}:{{{endpoint}}}:usage"

    async def _streams(self) -> list[str]:
        endpoints = sorted(_decode(e) for e in await self._r.smembers(f"{self._prefix}:endpoints"))
        keys = [self.stream(e) for e in endpoints]
        for key in keys:
            if key not in self._grouped:
                try:
                    await self._r.xgroup_create(key, self._group, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                self._grouped.add(key)
        return keys

    async def _own_pending(self, keys: list[str]) -> list[tuple[str, str, dict]]:
        """Records this consumer name read and never acknowledged (its writer died, and this is
        the writer restarted), re-read with ``XREADGROUP ... 0``: first, once per stream until
        it has none left, so a restarted writer finishes its own batch at once rather than after
        ``claim_idle_seconds``. An entry deleted meanwhile (written and deleted, its
        acknowledgement lost) is only acknowledged."""
        todo = [k for k in keys if k not in self._recovered]
        if not todo:
            return []
        resp = await self._r.xreadgroup(self._group, self.consumer, {k: "0" for k in todo},
                                        count=self._batch)
        got: dict[str, list] = {_decode(key): entries for key, entries in resp or []}
        out, gone = [], []
        for key in todo:
            entries = got.get(key) or []
            if not entries:
                self._recovered.add(key)
            for i, f in entries:
                if f:
                    out.append((key, _decode(i), {_decode(k): _decode(v) for k, v in f.items()}))
                else:
                    gone.append((key, _decode(i), {}))
        if gone:
            await self._ack(gone)
        if out:
            log.info("re-reading %d usage record(s) this writer (%s) read before and never "
                     "acknowledged", len(out), self.consumer)
        return out

    async def _claim(self, keys: list[str]) -> list[tuple[str, str, dict]]:
        """Records other writers read and never acknowledged (they died), idle long enough."""
        out = []
        for key in keys:
            start = "0-0"
            while True:
                resp = await self._r.xautoclaim(key, self._group, self.consumer,
                                                self._claim_idle_ms, start, count=self._batch)
                start, entries = _decode(resp[0]), resp[1]
                out += [(key, _decode(i), {_decode(k): _decode(v) for k, v in f.items()})
                        for i, f in entries if f is not None]
                if start == "0-0" or len(out) >= self._batch:
                    break
        return out

    async def _read(self, keys: list[str]) -> list[tuple[str, str, dict]]:
        if not keys:
            await asyncio.sleep(self._block_ms / 1000)
            return []
        resp = await self._r.xreadgroup(self._group, self.consumer, {k: ">" for k in keys},
                                        count=self._batch, block=self._block_ms)
        return [(_decode(key), _decode(i), {_decode(k): _decode(v) for k, v in f.items()})
                for key, entries in resp or [] for i, f in entries]

    async def backlog(self) -> int:
        keys = [self.stream(_decode(e)) for e in await self._r.smembers(f"{self._prefix}:endpoints")]
        async with self._r.pipeline(transaction=False) as p:
            for k in keys:
                p.xlen(k)
            return sum(await p.execute())

    # ------------------------------------------------------------------ the database

    async def _table_of(self, endpoint: str) -> str:
        if endpoint not in self._tables:
            raw = await self._r.hget(REGISTRY, endpoint)
            prefix = ""
            if raw:
                prefix = (json.loads(raw).get("ai_gateway", {}).get("inference_table", {})
                          .get("table_name_prefix", ""))
            self._tables[endpoint] = await asyncio.to_thread(
                self._db.ensure_inference_table, endpoint, prefix)
        return self._tables[endpoint]

    async def _write(self, batch: list[tuple[str, str, dict]]) -> None:
        """Insert the batch (usage rows and payload rows); retried until the database takes it."""
        rows = [usage_row(f) for _, _, f in batch]
        payloads: dict[str, list[dict]] = {}
        for _, _, f in batch:
            row = payload_row(f)
            if row is not None:
                payloads.setdefault(f.get("endpoint", ""), []).append(row)
        delay = 0.5
        while True:
            try:
                for endpoint, prow in payloads.items():
                    await asyncio.to_thread(self._db.insert_payloads,
                                            await self._table_of(endpoint), prow)
                n = await asyncio.to_thread(self._db.insert_usage, rows)
                self.written += n
                ROWS_WRITTEN.inc(n)
                self._health(True)
                return
            except DatabaseUnavailable as exc:
                self._health(False)
                await self._alarm(f"usage database unreachable ({exc})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _ack(self, batch: list[tuple[str, str, dict]]) -> None:
        by_key: dict[str, list[str]] = {}
        for key, entry_id, _ in batch:
            by_key.setdefault(key, []).append(entry_id)
        async with self._r.pipeline(transaction=False) as p:
            for key, ids in by_key.items():
                p.xack(key, self._group, *ids)
                p.xdel(key, *ids)
            await p.execute()

    async def _entities(self) -> None:
        """Every endpoint's served entities, one row per config version."""
        rows = []
        for raw in (await self._r.hgetall(REGISTRY)).values():
            ep = json.loads(raw)
            when = _utc(ep.get("update_time_ms") or time.time() * 1000)
            for se in ep.get("served_entities", []):
                rows.append({"endpoint_name": ep["name"], "entity_name": se.get("name") or se["model"],
                             "model": se["model"], "config_version": ep.get("config_version", 0),
                             "change_time": when})
        if rows:
            await asyncio.to_thread(self._db.insert_served_entities, rows)

    # ------------------------------------------------------------------ the loop

    def _health(self, db_ok: bool) -> None:
        if db_ok != self._db_ok:
            self._db_ok = db_ok
            if db_ok:
                log.info("usage database reachable again; writing")
            self._report()

    def _report(self) -> None:
        healthy = self._db_ok and not self._backlog_over
        if healthy != self.healthy:
            self.healthy = healthy
            if self._on_health is not None:
                self._on_health(healthy)

    async def _alarm(self, why: str) -> None:
        now = time.monotonic()
        if now - self._alarm_at < 10:
            return
        self._alarm_at = now
        try:
            waiting = await self.backlog()
        except (RedisError, OSError):
            waiting = -1
        log.error("%s; %s usage records waiting in Redis", why,
                  waiting if waiting >= 0 else "an unknown number of")

    async def drain_once(self) -> int:
        """One round: this consumer's own unacknowledged records first (after a restart), then
        abandoned ones of other writers (now and then), else new ones; write, ack."""
        keys = await self._streams()
        now = time.monotonic()
        batch = await self._own_pending(keys)
        if not batch and now - self._claimed_at >= self._claim_idle_ms / 2000:
            self._claimed_at = now
            batch = await self._claim(keys)
        if not batch:
            batch = await self._read(keys)
        if now - self._entities_at >= self._entities_interval:
            self._entities_at = now
            try:
                await self._entities()
            except DatabaseUnavailable as exc:
                await self._alarm(f"usage database unreachable ({exc})")
        if batch:
            good = await self._set_aside_malformed(batch)
            if good:
                await self._write(good)
            await self._ack(batch)
        return len(batch)

    async def _set_aside_malformed(self, batch: list[tuple[str, str, dict]]):
        """Records that cannot become rows (a bug upstream, never a caller's doing) go to the
        dead-letter stream ``<prefix>:usage-dead`` with the reason, instead of stopping the
        writer or being retried forever; the rest are returned."""
        good, bad = [], []
        for item in batch:
            try:
                usage_row(item[2])
                payload_row(item[2])
                good.append(item)
            except (KeyError, ValueError, TypeError) as exc:
                bad.append((item, exc))
        if bad:
            async with self._r.pipeline(transaction=False) as p:
                for (key, entry_id, fields), exc in bad:
                    p.xadd(f"{self._prefix}:usage-dead",
                           {**fields, "_stream": key, "_id": entry_id, "_error": repr(exc)[:500]})
                await p.execute()
            log.error("%d malformed usage record(s) set aside in %s:usage-dead (first: %r)",
                      len(bad), self._prefix, bad[0][1])
        return good

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                n = await self.drain_once()
                delay = 0.1
                await self._check_backlog()
                if 0 < n < self._batch and self._linger:
                    await asyncio.sleep(self._linger)  # let the next batch fill
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("usage streams unreachable (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:  # noqa: BLE001 - the writer must outlive any one bad round
                log.exception("usage writer round failed; retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _check_backlog(self, every: float = 5.0) -> None:
        """Records waiting above the alarm level: NOT_SERVING and an error in the log."""
        now = time.monotonic()
        if now - self._backlog_at < every:
            return
        self._backlog_at = now
        waiting = await self.backlog()
        BACKLOG.set(waiting)
        over = waiting > self._backlog_alarm
        if over != self._backlog_over:
            self._backlog_over = over
            self._report()
        if over:
            await self._alarm(f"the usage backlog ({waiting}) is over its alarm level "
                              f"({self._backlog_alarm})")
