"""The quota's state in Redis, changed only by the Lua scripts below (each one atomic).

Key layout: everything about endpoint ``E`` shares the hash tag ``{E}``, so each script touches
one slot and the layout works on Redis Cluster unchanged (``P`` = ``<key_prefix>:{E}:``)::

    P b:<dim>:<who>   token bucket (hash l=level, t=ms); expires once it would be full again,
                      a missing bucket reads as full. dim: r requests, i input, o output, k input + output,
                      t provisioned throughput; who: "endpoint" or "p:<kind>:<principal>"
    P res:<id>        a reservation: the record's fields known at admission, start time,
                      tokens charged, the buckets charged, the admission's answer (for replays)
    P leases          sorted set of reserved request ids scored by lease expiry (ms)
    P done:<id>       the id is finished: settled (kept settled_ttl) or refused (until it fits)
    P usage           the usage stream: one record per request (admitted or refused), until
                      the SQL writer has them; past usage_backlog_max, admission refuses
    P stats           demand and admitted token rates (moving averages), provisioned capacity
    <key_prefix>:endpoints   set of endpoint names seen (the reaper's list; the SQL writer's
                             list of streams to drain)

Usage streams are per endpoint because a settlement (refund + delete reservation + XADD) must be
one script on one slot; a single global stream would live in another slot. The SQL writer
reads ``<key_prefix>:endpoints`` and drains every endpoint's stream with a consumer group.

Scripts declare the per-endpoint keys they always use (and the buckets); keys of one request
(``res:``, ``done:``) are derived inside the scripts from ``P``: same hash tag, same slot, which
Redis Cluster allows. Times come from Redis' own clock (TIME), never a replica's.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import NoScriptError, RedisError

from fmapi_common.errors import Unavailable

from .domain import Admission, Bucket, Settlement

log = logging.getLogger(__name__)

# Shared by every script. ARGV[1..5] and KEYS[1..3] are the same in all of them.
_COMMON = r"""
local P, LEASE, DONE_TTL, BACKLOG, TAU = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5])
local LEASES, STREAM, STATS = KEYS[1], KEYS[2], KEYS[3]

-- Numbers are written with 17 significant digits (Lua's default 14 would drift).
local function num(x) return string.format('%.17g', x) end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

-- A token bucket's level at `now`: the stored level plus what refilled since (per_ms tokens
-- per millisecond), capped at its capacity. A missing bucket is full.
local function level_at(key, cap, per_ms, now)
  local s = redis.call('HMGET', key, 'l', 't')
  if not s[1] then return cap end
  return math.min(cap, tonumber(s[1]) + (now - tonumber(s[2])) * per_ms)
end

-- Store a bucket's level; it expires (reads as full) once it would have refilled anyway.
local function set_level(key, level, cap, per_ms, now)
  redis.call('HSET', key, 'l', num(level), 't', num(now))
  redis.call('PEXPIRE', key, math.ceil((cap - level) / per_ms) + 1000)
end

-- A moving rate in tokens per second (hash fields <name>, <name>_t): exponentially weighted,
-- time constant TAU ms, read at `now`.
local function rate_at(name, now)
  local s = redis.call('HMGET', STATS, name, name .. '_t')
  if not s[1] then return 0 end
  return tonumber(s[1]) * math.exp((tonumber(s[2]) - now) / TAU)
end

local function rate_add(name, tokens, now)
  local r = math.max(0, rate_at(name, now) + tokens * 1000 / TAU)
  redis.call('HSET', STATS, name, num(r), name .. '_t', num(now))
end

-- Append one usage record: the fields known at admission (JSON list: field, value, ...), then
-- the outcome's.
local function record(rec_json, outcome)
  local args = {STREAM, '*'}
  for _, v in ipairs(cjson.decode(rec_json)) do table.insert(args, v) end
  for _, v in ipairs(outcome) do table.insert(args, v) end
  redis.call('XADD', unpack(args))
end

local function outcome(inp, out, status, start, dur, ttft, reason, expired, extra)
  local o = {'input_tokens', num(inp), 'output_tokens', num(out), 'status_code', status,
             'start_ms', num(math.floor(start)), 'duration_ms', num(math.floor(dur)),
             'ttft_ms', ttft, 'finish_reason', reason, 'expired', expired}
  for _, v in ipairs(extra or {}) do table.insert(o, v) end
  return o
end

-- Settle reservation `id` with what it really used (out, inp; nil = as reserved / charged):
-- the difference goes back to every bucket it was charged to (a refund capped at capacity; a
-- use above the reservation becomes debt), exactly one usage record is written, the
-- reservation and its lease are dropped and the id is remembered as settled. False when no
-- such reservation exists.
local function settle(id, out, inp, status, ttft, dur, reason, expired, now, extra)
  local res = P .. 'res:' .. id
  local h = redis.call('HMGET', res, 'rec', 'start', 'in', 'out', 'buckets')
  if not h[1] then return false end
  local start, charged_in, reserved_out = tonumber(h[2]), tonumber(h[3]), tonumber(h[4])
  out, inp = out or reserved_out, inp or charged_in
  local back = {r = 0, i = charged_in - inp, o = reserved_out - out}
  back.t = back.i + back.o
  back.k = back.t
  for _, b in ipairs(cjson.decode(h[5])) do
    if back[b.d] ~= 0 then
      set_level(b.k, math.min(b.c, level_at(b.k, b.c, b.r, now) + back[b.d]), b.c, b.r, now)
    end
  end
  if dur <= 0 then dur = now - start end
  record(h[1], outcome(inp, out, status, start, dur, ttft, reason, expired, extra))
  -- What was refunded leaves the admitted-tokens rate as it entered it (decayed since).
  rate_add('used', -back.t * math.exp((start - now) / TAU), now)
  redis.call('DEL', res)
  redis.call('ZREM', LEASES, id)
  redis.call('SET', P .. 'done:' .. id, cjson.encode({s = 'settled'}), 'PX', DONE_TTL)
  return true
end
"""

# Admit: check every bucket, then charge all of them or none.
_ADMIT = r"""
-- KEYS[4..]: the buckets. ARGV[6] request id, [7] the record's fields (JSON), [8] input tokens,
-- [9] reserved output tokens, [10] 400 when the request can never fit (decided by the caller;
-- it is only recorded) else 0, [11] provisioned tokens/s; then per bucket: dimension,
-- capacity, refill per ms, amount. Returns {answer JSON, now, replayed, lease expiry}.
local now = now_ms()
local id, rec, inp, out = ARGV[6], ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local res, done = P .. 'res:' .. id, P .. 'done:' .. id

-- A replayed id gets the first call's answer and is charged nothing.
local prev = redis.call('GET', done)
if prev then return {prev, num(now), 1, '0'} end
prev = redis.call('HGET', res, 'answer')
if prev then return {prev, num(now), 1, redis.call('ZSCORE', LEASES, id)} end

-- Usage records waiting for the SQL writer (the database is down): past BACKLOG of them,
-- new requests are refused and not recorded, so the stream stops growing and nothing in it is
-- ever dropped; settlements of admitted requests are still recorded.
if BACKLOG > 0 then
  local waiting = redis.call('XLEN', STREAM)
  if waiting >= BACKLOG then return {cjson.encode({s = 'backlog', n = waiting}), num(now), 0, '0'} end
end

rate_add('demand', inp + out, now)
redis.call('HSET', STATS, 'pt', ARGV[11])

-- A refusal is recorded (zero tokens) and remembered, so a replay neither records it again
-- nor gets another answer, until the request would fit (at least a second).
local function refuse(status, answer, ttl)
  record(rec, outcome(0, 0, status, now, 0, 0, '', 0))
  answer = cjson.encode(answer)
  redis.call('SET', done, answer, 'PX', math.ceil(math.max(ttl, 1000)))
  return {answer, num(now), 0, '0'}
end
if ARGV[10] ~= '0' then return refuse(tonumber(ARGV[10]), {s = 'invalid'}, 0) end

-- It fits when every bucket holds its amount; else when the slowest one will have refilled.
local n, levels, wait, binding = (#ARGV - 11) / 4, {}, 0, -1
for i = 1, n do
  local j = 11 + 4 * (i - 1)
  local per_ms, amount = tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4])
  levels[i] = level_at(KEYS[3 + i], tonumber(ARGV[j + 2]), per_ms, now)
  if levels[i] < amount and (amount - levels[i]) / per_ms > wait then
    wait, binding = (amount - levels[i]) / per_ms, i - 1
  end
end
if binding >= 0 then
  return refuse(429, {s = 'refused', at = num(now + wait), b = binding}, wait)
end

-- Charge them all, and keep what was charged where, under a lease, for the settlement.
local charged, state = {}, {}
for i = 1, n do
  local j = 11 + 4 * (i - 1)
  local cap, per_ms = tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3])
  local level = levels[i] - tonumber(ARGV[j + 4])
  set_level(KEYS[3 + i], level, cap, per_ms, now)
  charged[i] = {k = KEYS[3 + i], d = ARGV[j + 1], c = cap, r = per_ms}
  state[i] = {math.floor(level), math.ceil((cap - level) / per_ms)}
end
local answer = cjson.encode({s = 'admitted', st = state, at = num(now)})
redis.call('HSET', res, 'rec', rec, 'start', num(now), 'in', num(inp), 'out', num(out),
           'buckets', cjson.encode(charged), 'answer', answer)
redis.call('ZADD', LEASES, num(now + LEASE), id)
rate_add('used', inp + out, now)
return {answer, num(now), 0, num(now + LEASE)}
"""

_SETTLE = r"""
-- ARGV[6] request id, [7] output tokens, [8] input tokens (-1: as charged), [9] status code,
-- [10] time to first token ms, [11] duration ms (0: measured here), [12] finish reason,
-- [13] more record fields (JSON list: field, value, ...).
local now = now_ms()
if redis.call('EXISTS', P .. 'done:' .. ARGV[6]) == 1 then return 'already' end
local inp = tonumber(ARGV[8])
if inp < 0 then inp = nil end
if settle(ARGV[6], tonumber(ARGV[7]), inp, ARGV[9], ARGV[10], tonumber(ARGV[11]), ARGV[12], 0,
          now, cjson.decode(ARGV[13])) then
  return 'settled'
end
return 'unknown'
"""

# Reap: settle expired reservations at their reserved size, marked expired. Finding and
# settling them is one script, so replicas reaping at once never settle one twice.
_REAP = r"""
-- ARGV[6]: at most this many. Returns how many were settled.
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', LEASES, '-inf', num(now), 'LIMIT', 0, tonumber(ARGV[6]))
local n = 0
for _, id in ipairs(ids) do
  if settle(id, nil, nil, 0, 0, 0, 'expired', 1, now) then n = n + 1
  else redis.call('ZREM', LEASES, id) end
end
return n
"""

_RENEW = r"""
-- ARGV[6] request id. Returns the new lease expiry, or nil when not reserved.
local now = now_ms()
if redis.call('EXISTS', P .. 'res:' .. ARGV[6]) == 0 then return false end
redis.call('ZADD', LEASES, 'XX', num(now + LEASE), ARGV[6])
return num(now + LEASE)
"""

_CAPACITY = r"""
-- Returns {demand tokens/s, admitted tokens/s, requests in flight, provisioned tokens/s}.
local now = now_ms()
return {num(rate_at('demand', now)), num(rate_at('used', now)), redis.call('ZCARD', LEASES),
        redis.call('HGET', STATS, 'pt') or '0'}
"""


@dataclass(frozen=True)
class AdmitAnswer:
    """The admission script's answer: ``answer['s']`` is admitted, refused, invalid, backlog
    (too many usage records wait for the SQL writer) or settled."""

    answer: dict
    now_ms: float
    replayed: bool
    lease_ms: float


@dataclass(frozen=True)
class Capacity:
    demand_tokens_per_second: float
    admitted_tokens_per_second: float
    in_flight_requests: int
    provisioned_tokens_per_second: int


def _admit_answer(raw) -> AdmitAnswer:
    answer, now, replayed, lease = raw
    return AdmitAnswer(json.loads(answer), float(now), replayed == 1, float(lease or 0))


@contextlib.contextmanager
def _fail_closed():
    """Redis unreachable (or refusing writes): UNAVAILABLE, so nothing runs unmetered."""
    try:
        yield
    except (RedisError, OSError) as exc:
        log.warning("redis: %s", exc)  # the detail (paths, script errors) stays in the log
        raise Unavailable("the quota store (Redis) is unavailable; retry shortly",
                          retry_after=1.0) from None


class QuotaStore:
    def __init__(
        self,
        client: redis.Redis,
        *,
        key_prefix: str = "fmapi:quota",
        lease_seconds: float = 600.0,
        settled_ttl_seconds: float = 3600.0,
        usage_backlog_max: int = 0,
        demand_window_seconds: float = 60.0,
        reap_batch: int = 100,
    ) -> None:
        self._r = client
        self._prefix = key_prefix
        self._settings = [int(lease_seconds * 1000), int(settled_ttl_seconds * 1000),
                          usage_backlog_max, demand_window_seconds * 1000]
        self._reap_batch = reap_batch
        self._admit = client.register_script(_COMMON + _ADMIT)
        self._settle = client.register_script(_COMMON + _SETTLE)
        self._reap = client.register_script(_COMMON + _REAP)
        self._renew = client.register_script(_COMMON + _RENEW)
        self._capacity = client.register_script(_COMMON + _CAPACITY)
        self._known: set[str] = set()  # endpoints this replica has added to the endpoints set

    # ------------------------------------------------------------------ keys

    @property
    def endpoints_key(self) -> str:
        return f"{self._prefix}:endpoints"

    def _ns(self, endpoint: str) -> str:
        return f"{self._prefix}:{{{endpoint}}}:"

    def usage_stream(self, endpoint: str) -> str:
        return self._ns(endpoint) + "usage"

    def bucket_key(self, endpoint: str, b: Bucket) -> str:
        return f"{self._ns(endpoint)}b:{b.dim}:{b.who}"

    def _call(self, endpoint: str) -> tuple[list[str], list]:
        """The keys and arguments every script starts with."""
        ns = self._ns(endpoint)
        return [ns + "leases", ns + "usage", ns + "stats"], [ns, *self._settings]

    # ------------------------------------------------------------------ scripts

    def _admit_call(self, a: Admission, bs: list[Bucket], refuse: int) -> tuple[list[str], list]:
        keys, args = self._call(a.endpoint)
        rec = json.dumps([v for pair in a.record_fields() for v in pair])
        args += [a.request_id, rec, a.input_tokens, a.reserved_output_tokens, refuse,
                 a.tokens_per_second]
        for b in bs:
            keys.append(self.bucket_key(a.endpoint, b))
            args += [b.dim, repr(b.capacity), repr(b.per_ms), b.amount]
        return keys, args

    async def _note_endpoints(self, endpoints: set[str]) -> None:
        """Endpoints new to this replica go in the reaper's list before their first
        reservation."""
        new = endpoints - self._known
        if new:
            await self._r.sadd(self.endpoints_key, *new)
            self._known |= new

    async def admit(self, a: Admission, bs: list[Bucket], refuse: int = 0) -> AdmitAnswer:
        keys, args = self._admit_call(a, bs, refuse)
        with _fail_closed():
            await self._note_endpoints({a.endpoint})
            return _admit_answer(await self._admit(keys=keys, args=args))

    async def admit_many(self, items: list[tuple[Admission, list[Bucket], int]]) -> list[AdmitAnswer]:
        """:meth:`admit` for each (admission, buckets, refuse), in one round trip (a pipeline,
        not a transaction: each admission is its own atomic script, as it would be alone)."""
        if not items:
            return []
        with _fail_closed():
            await self._note_endpoints({a.endpoint for a, _, _ in items})
            raws = await self._pipelined(self._admit, [self._admit_call(a, bs, refuse)
                                                       for a, bs, refuse in items])
            return [_admit_answer(raw) for raw in raws]

    async def _pipelined(self, script, calls: list[tuple[list[str], list]]) -> list:
        """``script`` once per (keys, args), in one pipeline (not a transaction): their answers
        in order. By its SHA alone: redis-py's own pipelining of a script asks Redis whether
        it knows the script first, a second round trip on every call. Calls that find Redis
        without the script (restarted, flushed) load it and run again; those never ran."""
        out: list = [None] * len(calls)
        todo = list(range(len(calls)))
        loaded = False
        while True:
            async with self._r.pipeline(transaction=False) as pipe:
                for i in todo:
                    keys, args = calls[i]
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                for i, r in zip(todo, await pipe.execute(raise_on_error=False)):
                    out[i] = r
            todo = [i for i in todo if isinstance(out[i], NoScriptError)]
            if not todo or loaded:
                break
            await self._r.script_load(script.script)
            loaded = True
        for r in out:
            if isinstance(r, Exception):
                raise r
        return out

    def _settle_call(self, s: Settlement) -> tuple[list[str], list]:
        keys, args = self._call(s.endpoint)
        return keys, [*args, s.request_id, s.output_tokens,
                      -1 if s.input_tokens is None else s.input_tokens, s.status_code,
                      s.time_to_first_token_ms, s.duration_ms, s.finish_reason,
                      json.dumps(s.extra_fields())]

    async def settle(self, s: Settlement) -> str:
        """'settled', 'already' (settled before, or refused at admission) or 'unknown'."""
        keys, args = self._settle_call(s)
        with _fail_closed():
            return await self._settle(keys=keys, args=args)

    async def settle_many(self, settlements: list[Settlement]) -> list[str]:
        """:meth:`settle` for each, in one round trip (a pipeline, not a transaction: each
        settlement is its own atomic script, as it would be alone)."""
        if not settlements:
            return []
        with _fail_closed():
            return await self._pipelined(self._settle, [self._settle_call(s)
                                                        for s in settlements])

    async def renew(self, endpoint: str, request_id: str) -> float | None:
        """The new lease expiry (ms), or None when the request is not reserved."""
        keys, args = self._call(endpoint)
        with _fail_closed():
            out = await self._renew(keys=keys, args=[*args, request_id])
        return None if out is None else float(out)

    async def reap(self) -> int:
        """Settle every endpoint's expired reservations; returns how many."""
        with _fail_closed():
            if self._known:  # back in the list should Redis have lost it
                await self._r.sadd(self.endpoints_key, *self._known)
            total = 0
            for endpoint in await self._r.smembers(self.endpoints_key):
                keys, args = self._call(endpoint)
                total += await self._reap(keys=keys, args=[*args, self._reap_batch])
            return total

    async def capacity(self, endpoint: str) -> Capacity:
        keys, args = self._call(endpoint)
        with _fail_closed():
            demand, used, inflight, pt = await self._capacity(keys=keys, args=args)
        return Capacity(float(demand), float(used), int(inflight), int(pt))
