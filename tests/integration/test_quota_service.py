"""The quota service: two replicas on one real Redis, reached over mutual TLS as the gateway.

Each test uses its own endpoint name, so its buckets, reservations and usage stream are its own.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest
import redis
from google.rpc import status_pb2

from fmapi.quota.v1 import quota_pb2 as pb
from fmapi.quota.v1 import quota_pb2_grpc
from fmapi_cli.supervisor import Supervisor
from fmapi_common.errors import (
    InvalidArgument,
    ResourceExhausted,
    from_rpc_error,
    from_status,
)
from helpers import tls
from helpers.redis_server import RedisServer, free_port, redis_server_binary

LEASE_SECONDS = 4.0
BACKLOG_MAX = 1000  # usage records an endpoint's stream may hold before admission refuses
PREFIX = "fmapi:quota"
ENDPOINT, PRINCIPAL = pb.LIMIT_KEY_ENDPOINT, pb.LIMIT_KEY_PRINCIPAL


def _start_replicas(sup: Supervisor, tmp, redis_url: str, n: int) -> list[str]:
    addrs = []
    for i in range(n):
        pf = tmp / f"quota-{i}.port"
        child = sup.start(f"quota-{i}", [sys.executable, "-m", "fmapi_quota"], {
            "FMAPI_QUOTA_REDIS_URL": redis_url,
            "FMAPI_QUOTA_PORT_FILE": str(pf),
            "FMAPI_QUOTA_LEASE_SECONDS": str(LEASE_SECONDS),
            "FMAPI_QUOTA_REAP_INTERVAL_SECONDS": "0.2",
            # 100 concurrent calls per replica on 2 busy cores may queue longer than the default
            # 0.5 s; these tests are about exactness (a dead Redis still fails at once).
            "FMAPI_QUOTA_REDIS_TIMEOUT_SECONDS": "3",
            "FMAPI_QUOTA_USAGE_BACKLOG_MAX": str(BACKLOG_MAX),
            **tls.env("FMAPI_QUOTA_", "quota"),
        })
        addrs.append(child)
    return [f"127.0.0.1:{sup.wait_for_file(c, tmp / f'quota-{i}.port', 30)}"
            for i, c in enumerate(addrs)]


@pytest.fixture(scope="module")
def quota(tmp_path_factory):
    """Two quota replicas sharing one Redis: (addresses, Redis client)."""
    tmp = tmp_path_factory.mktemp("quota")
    server = RedisServer(tmp).start()
    sup = Supervisor(tmp / "logs")
    try:
        addrs = _start_replicas(sup, tmp, server.url, 2)
        yield addrs, redis.Redis.from_url(server.url, decode_responses=True)
    finally:
        sup.stop()
        server.stop()


@pytest.fixture
async def stubs(quota):
    """One stub per replica, as the gateway sees them."""
    channels = [tls.aio_channel(a, "gateway", "quota") for a in quota[0]]
    yield [quota_pb2_grpc.QuotaServiceStub(ch) for ch in channels]
    for ch in channels:
        await ch.close()


@pytest.fixture
def db(quota) -> redis.Redis:
    return quota[1]


def _endpoint() -> str:
    return f"ep-{uuid.uuid4().hex[:10]}"


def _admit(endpoint: str, rules=(), *, principal="alice", inp=10, out=0, rid=None, **kw):
    return pb.AdmitRequest(
        request_id=rid or uuid.uuid4().hex, endpoint=endpoint, served_model="m1",
        capacity_mode=kw.pop("mode", pb.CAPACITY_MODE_PAY_PER_TOKEN),
        caller=pb.Caller(principal=principal, principal_kind=pb.PRINCIPAL_KIND_USER,
                         token_id="tok-1", workspace="ws"),
        input_tokens=inp, reserved_output_tokens=out, rules=list(rules), **kw,
    )


def _rule(key, rpm=0, itpm=0, otpm=0) -> pb.LimitRule:
    return pb.LimitRule(key=key, requests_per_minute=rpm, input_tokens_per_minute=itpm,
                        output_tokens_per_minute=otpm)


def _records(db: redis.Redis, endpoint: str) -> list[dict]:
    return [fields for _, fields in db.xrange(f"{PREFIX}:{{{endpoint}}}:usage")]


@dataclass
class Burst:
    admitted: list[pb.AdmitRequest] = field(default_factory=list)
    responses: list[pb.AdmitResponse] = field(default_factory=list)
    refused: list[grpc.aio.AioRpcError] = field(default_factory=list)
    seconds: float = 0.0


async def _burst(stubs, requests) -> Burst:
    """Send every request at once, alternating replicas; anything but 429 fails the test."""
    t0 = time.monotonic()
    got = await asyncio.gather(
        *(stubs[i % len(stubs)].Admit(r) for i, r in enumerate(requests)), return_exceptions=True)
    out = Burst(seconds=time.monotonic() - t0)
    for req, g in zip(requests, got):
        if isinstance(g, pb.AdmitResponse):
            out.admitted.append(req)
            out.responses.append(g)
        else:
            assert isinstance(g, grpc.aio.AioRpcError), g
            assert g.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, g
            out.refused.append(g)
    return out


def _refill(limit_per_minute: int, seconds: float) -> float:
    return limit_per_minute / 60 * seconds


# ---------------------------------------------------------------- exactness under concurrency


async def test_requests_per_minute_are_exact_across_replicas(stubs, db):
    ep, n = _endpoint(), 20
    reqs = [_admit(ep, [_rule(ENDPOINT, rpm=n)], principal=f"user{i}") for i in range(200)]
    b = await _burst(stubs, reqs)
    # Exactly N, plus whatever refilled while the burst ran (none unless it took over 3 s).
    assert n <= len(b.admitted) <= n + math.floor(_refill(n, b.seconds)), b.seconds
    records = _records(db, ep)
    assert len(records) == len(b.refused) and {r["status_code"] for r in records} == {"429"}


async def test_input_tokens_per_minute_are_exact_across_replicas(stubs, db):
    ep, limit, size = _endpoint(), 1000, 50
    rules = [_rule(ENDPOINT, itpm=limit)]
    reqs = [_admit(ep, rules, inp=size, principal=f"u{i}") for i in range(200)]
    b = await _burst(stubs, reqs)
    assert limit // size <= len(b.admitted) <= (limit + _refill(limit, b.seconds)) // size


async def test_output_reservations_are_exact_and_refunded_to_what_was_generated(stubs, db):
    ep, limit, reserve, generated = _endpoint(), 1000, 50, 10
    rules = [_rule(ENDPOINT, otpm=limit)]
    t0 = time.monotonic()
    reqs = [_admit(ep, rules, out=reserve, principal=f"u{i}") for i in range(200)]
    b = await _burst(stubs, reqs)
    admitted = b.admitted
    # Reservations never exceed the limit (plus refill during the burst).
    assert limit // reserve <= len(admitted) <= (limit + _refill(limit, b.seconds)) // reserve
    settled = await asyncio.gather(*(
        stubs[i % 2].Settle(pb.SettleRequest(request_id=r.request_id, endpoint=ep,
                                             output_tokens=generated, status_code=200))
        for i, r in enumerate(admitted)))
    assert not any(s.already_settled for s in settled)
    # What is left is the limit minus what was really generated (plus refill since the start).
    probe = await stubs[0].Admit(_admit(ep, rules, out=0))
    spent = generated * len(admitted)
    since = time.monotonic() - t0
    assert limit - spent <= probe.tokens.remaining <= limit - spent + _refill(limit, since) + 1
    assert probe.tokens.limit == limit
    outs = sorted(int(r["output_tokens"]) for r in _records(db, ep) if r["status_code"] == "200")
    assert outs == [generated] * len(admitted)


async def test_a_refused_request_says_exactly_when_it_would_fit(stubs, db):
    ep = _endpoint()
    rules = [_rule(PRINCIPAL, rpm=60)]  # one request per second once the minute's are spent
    b = await _burst(stubs, [_admit(ep, rules) for _ in range(61)])
    assert len(b.admitted) == 60 and len(b.refused) == 1
    err = from_rpc_error(b.refused[0])
    # A whole request's refill (1 s), less what refilled since the first charge.
    assert 1.0 - b.seconds - 0.01 < err.retry_after <= 1.0, (err.retry_after, b.seconds)
    assert "requests per minute for user alice" in err.message
    t0 = time.monotonic()
    await asyncio.sleep(err.retry_after)
    resp = await stubs[1].Admit(_admit(ep, rules))
    late = time.monotonic() - t0 - err.retry_after  # refilled past the one request
    assert resp.requests.limit == 60 and resp.requests.remaining <= math.floor(_refill(60, late))
    assert (59 - resp.requests.remaining) * 1000 < resp.requests.reset_ms <= 60_000


# ---------------------------------------------------------------- settlement and records


async def test_settlement_is_idempotent_one_record_one_refund(stubs, db):
    ep, rid = _endpoint(), uuid.uuid4().hex
    rules = [_rule(PRINCIPAL, otpm=1000)]
    req = _admit(ep, rules, out=100, rid=rid, streaming=True, client_request_id="c-7",
                 usage_context={"end_user": "u-42"})
    t0 = time.monotonic()
    first = await stubs[0].Admit(req)
    assert first.tokens.remaining == 900 and not first.replayed
    replay = await stubs[1].Admit(req)  # charged nothing twice
    assert replay.replayed and replay.tokens.remaining == 900
    settle = pb.SettleRequest(request_id=rid, endpoint=ep, output_tokens=30, status_code=200,
                              time_to_first_token_ms=12, finish_reason="stop")
    a, b = await asyncio.gather(stubs[0].Settle(settle), stubs[1].Settle(settle))
    assert sorted([a.already_settled, b.already_settled]) == [False, True]
    assert (await stubs[0].Settle(settle)).already_settled
    [rec] = _records(db, ep)
    assert rec == {**rec, "request_id": rid, "client_request_id": "c-7",
                   "usage_context": '{"end_user": "u-42"}', "endpoint": ep, "served_model": "m1",
                   "principal": "alice", "principal_kind": "user", "token_id": "tok-1",
                   "workspace": "ws", "streaming": "1", "input_tokens": "10",
                   "output_tokens": "30", "status_code": "200", "ttft_ms": "12",
                   "finish_reason": "stop", "expired": "0"}
    assert int(rec["duration_ms"]) >= 0 and int(rec["start_ms"]) > 1.6e12
    probe = await stubs[1].Admit(_admit(ep, rules, out=0))
    refill = _refill(1000, time.monotonic() - t0)
    assert 970 <= probe.tokens.remaining <= 970 + refill  # refunded once
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a finished id is never admitted again
        await stubs[0].Admit(req)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs[0].Settle(pb.SettleRequest(request_id="nope", endpoint=ep))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_admit_many_admits_each_in_order_and_refuses_each_on_its_own(stubs, db):
    """What a gateway sends when admissions queued up: each is admitted or refused exactly as
    Admit would (the same limits, in order, with the same refusal details)."""
    ep = _endpoint()
    rules = [_rule(PRINCIPAL, rpm=2, otpm=100)]
    first = _admit(ep, rules, out=10)
    unreadable = _admit(ep, rules)
    unreadable.caller.principal_kind = pb.PRINCIPAL_KIND_UNSPECIFIED
    batch = [first,
             _admit(ep, rules, out=500),  # never fits the 100 output tokens a minute: 400
             _admit(ep, rules, out=10),
             _admit(ep, rules, out=10),  # the third request of a 2-a-minute limit: 429
             first,  # a replay of the first: admitted again, charged nothing
             unreadable]  # refused alone: 400
    got = await stubs[0].AdmitMany(pb.AdmitManyRequest(admissions=batch))
    kinds = [o.WhichOneof("outcome") for o in got.outcomes]
    assert kinds == ["admitted", "refused", "admitted", "refused", "admitted", "refused"]
    assert got.outcomes[4].admitted.replayed and not got.outcomes[0].admitted.replayed
    assert got.outcomes[2].admitted.requests.remaining == 0
    errs = [from_status(status_pb2.Status.FromString(got.outcomes[i].refused)) for i in (1, 3, 5)]
    assert isinstance(errs[0], InvalidArgument) and errs[0].param == "max_tokens"
    assert isinstance(errs[1], ResourceExhausted) and 0 < errs[1].retry_after <= 60
    assert isinstance(errs[2], InvalidArgument) and errs[2].param == "caller.principal_kind"
    # The two refused by a limit are recorded as refusals (the unreadable one is not).
    assert sorted(r["status_code"] for r in _records(db, ep)) == ["400", "429"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs[1].AdmitMany(pb.AdmitManyRequest(admissions=[_admit(ep)] * 1001))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1000" in err.value.details()


async def test_settle_many_settles_each_on_its_own_once(stubs, db):
    """What a gateway sends when settlements queued up: each is answered as Settle would, and
    one unknown or malformed settlement holds back none of the others."""
    ep, other = _endpoint(), _endpoint()
    rules = [_rule(PRINCIPAL, otpm=1000)]
    reqs = [_admit(ep, rules, out=100), _admit(ep, rules, out=100), _admit(other, rules, out=50)]
    for r in reqs:
        await stubs[0].Admit(r)
    t0 = time.monotonic()

    def settle(r, out):
        return pb.SettleRequest(request_id=r.request_id, endpoint=r.endpoint, output_tokens=out,
                                status_code=200, finish_reason="stop")

    batch = [settle(reqs[0], 10), pb.SettleRequest(request_id="never-admitted", endpoint=ep),
             settle(reqs[1], 20), pb.SettleRequest(request_id="bad", endpoint=ep, status_code=5000),
             settle(reqs[0], 99), settle(reqs[2], 30)]
    got = await stubs[1].SettleMany(pb.SettleManyRequest(settlements=batch))
    R = pb.SettleOutcome
    assert [o.result for o in got.outcomes] == [
        R.RESULT_SETTLED, R.RESULT_NOT_FOUND, R.RESULT_SETTLED, R.RESULT_INVALID,
        R.RESULT_ALREADY_SETTLED, R.RESULT_SETTLED]
    assert "never-admitted" in got.outcomes[1].message
    assert "status_code" in got.outcomes[3].message
    assert sorted(int(r["output_tokens"]) for r in _records(db, ep)) == [10, 20]
    assert [int(r["output_tokens"]) for r in _records(db, other)] == [30]
    again = await stubs[0].SettleMany(pb.SettleManyRequest(settlements=[settle(reqs[1], 1)]))
    assert [o.result for o in again.outcomes] == [R.RESULT_ALREADY_SETTLED]
    probe = await stubs[0].Admit(_admit(ep, rules, out=0))
    # 1000 - 10 - 20: each reservation refunded to what it generated, once.
    assert 970 <= probe.tokens.remaining <= 970 + _refill(1000, time.monotonic() - t0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs[0].SettleMany(pb.SettleManyRequest(
            settlements=[pb.SettleRequest(request_id=f"r{i}", endpoint=ep) for i in range(1001)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1000" in err.value.details()


async def test_batches_survive_redis_forgetting_the_scripts_and_run_each_once(stubs, db):
    """AdmitMany and SettleMany send their scripts by SHA alone; a Redis that lost them (a
    restart without persistence, SCRIPT FLUSH) gets them again, and each admission and
    settlement still runs exactly once."""
    ep = _endpoint()
    rules = [_rule(PRINCIPAL, rpm=1000, otpm=1000)]
    reqs = [_admit(ep, rules, out=100) for _ in range(3)]
    db.script_flush()
    got = await stubs[0].AdmitMany(pb.AdmitManyRequest(admissions=reqs))
    assert [o.WhichOneof("outcome") for o in got.outcomes] == ["admitted"] * 3
    assert not any(o.admitted.replayed for o in got.outcomes)
    assert [o.admitted.requests.remaining for o in got.outcomes] == [999, 998, 997]
    db.script_flush()
    settled = await stubs[1].SettleMany(pb.SettleManyRequest(settlements=[
        pb.SettleRequest(request_id=r.request_id, endpoint=ep, output_tokens=7, status_code=200)
        for r in reqs]))
    assert [o.result for o in settled.outcomes] == [pb.SettleOutcome.RESULT_SETTLED] * 3
    assert [int(r["output_tokens"]) for r in _records(db, ep)] == [7, 7, 7]


async def test_a_corrected_input_count_is_charged_at_settlement(stubs, db):
    ep, rid = _endpoint(), uuid.uuid4().hex
    rules = [_rule(PRINCIPAL, itpm=1000)]
    t0 = time.monotonic()
    assert (await stubs[0].Admit(_admit(ep, rules, inp=100, rid=rid))).tokens.remaining == 900
    await stubs[1].Settle(pb.SettleRequest(request_id=rid, endpoint=ep, input_tokens=40,
                                           output_tokens=0, status_code=200))
    probe = await stubs[0].Admit(_admit(ep, rules, inp=0))
    assert 960 <= probe.tokens.remaining <= 960 + _refill(1000, time.monotonic() - t0)
    assert _records(db, ep)[0]["input_tokens"] == "40"


async def test_refused_admissions_are_recorded_once(stubs, db):
    ep = _endpoint()
    rules = [_rule(PRINCIPAL, rpm=1, otpm=100)]
    await stubs[0].Admit(_admit(ep, rules, out=10))
    refused = _admit(ep, rules, out=10)
    for stub in stubs:  # the replay answers the same, and is not recorded again
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Admit(refused)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    never = _admit(ep, rules, out=101)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs[1].Admit(never)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(err.value).param == "max_tokens"
    records = {r["request_id"]: r for r in _records(db, ep)}
    assert len(_records(db, ep)) == 2
    assert records[refused.request_id]["status_code"] == "429"
    assert records[never.request_id]["status_code"] == "400"
    assert all(r["input_tokens"] == r["output_tokens"] == "0" for r in records.values())


# ---------------------------------------------------------------- keys


async def test_principals_are_isolated_under_the_endpoint_ceiling(stubs):
    ep = _endpoint()
    default = [_rule(ENDPOINT, rpm=5), _rule(PRINCIPAL, rpm=2)]
    override = [_rule(ENDPOINT, rpm=5), _rule(PRINCIPAL, rpm=4)]  # the gateway chose carol's

    assert await _admitted(stubs, ep, default, "alice", 3) == 2  # her own limit
    assert await _admitted(stubs, ep, default, "bob", 2) == 2  # untouched by alice's
    # 4 of the endpoint's 5 are spent: carol's own limit has room, the ceiling binds.
    assert await _admitted(stubs, ep, override, "carol", 3) == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs[0].Admit(_admit(ep, override, principal="carol"))
    assert "for the endpoint" in err.value.details()

    ep2 = _endpoint()  # a named override beats the default
    big = [_rule(ENDPOINT, rpm=100)]
    assert await _admitted(stubs, ep2, [*big, _rule(PRINCIPAL, rpm=4)], "carol", 6) == 4
    assert await _admitted(stubs, ep2, [*big, _rule(PRINCIPAL, rpm=2)], "dave", 6) == 2


async def _admitted(stubs, ep, rules, principal, n) -> int:
    b = await _burst(stubs, [_admit(ep, rules, principal=principal) for _ in range(n)])
    return len(b.admitted)


# ---------------------------------------------------------------- leases


async def test_expired_leases_are_settled_once_at_their_reserved_size(stubs, db):
    ep = _endpoint()
    rules = [_rule(ENDPOINT, otpm=100_000)]
    abandoned = [_admit(ep, rules, out=100) for _ in range(30)]
    b = await _burst(stubs, abandoned)
    assert len(b.admitted) == 30
    long_stream = _admit(ep, rules, out=100)
    await stubs[0].Admit(long_stream)
    await asyncio.sleep(LEASE_SECONDS * 0.6)
    renewed = await stubs[1].RenewLease(pb.RenewLeaseRequest(request_id=long_stream.request_id,
                                                              endpoint=ep))
    assert renewed.lease_expire_time_ms > b.responses[0].lease_expire_time_ms
    deadline = time.monotonic() + LEASE_SECONDS + 5
    while len(_records(db, ep)) < 30 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.6)  # both replicas reap several times more
    records = _records(db, ep)
    assert sorted(r["request_id"] for r in records) == sorted(r.request_id for r in abandoned)
    assert all((r["expired"], r["output_tokens"]) == ("1", "100") for r in records)
    late = pb.SettleRequest(request_id=abandoned[0].request_id, endpoint=ep, output_tokens=5)
    assert (await stubs[0].Settle(late)).already_settled
    # The renewed one still runs, and settles normally.
    done = await stubs[0].Settle(pb.SettleRequest(request_id=long_stream.request_id, endpoint=ep,
                                                  output_tokens=7, status_code=200))
    assert not done.already_settled
    assert _records(db, ep)[-1]["expired"] == "0"


# ---------------------------------------------------------------- provisioned throughput


async def test_provisioned_throughput_refuses_demand_above_capacity(stubs):
    ep, other = _endpoint(), _endpoint()
    pt = dict(mode=pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT,
              provisioned_throughput=pb.ProvisionedThroughput(tokens_per_second=100,
                                                              burst_seconds=2))
    b = await _burst(stubs, [_admit(ep, inp=50, out=50, **pt) for _ in range(5)])
    assert len(b.admitted) == 2 and len(b.refused) == 3  # capacity 200 tokens: two of 100
    err = from_rpc_error(b.refused[0])
    # 100 tokens at 100 per second, less what refilled during the burst.
    assert "provisioned throughput" in err.message
    assert 1.0 - b.seconds - 0.01 < err.retry_after <= 1.0
    assert b.responses[0].tokens.limit == 200
    with pytest.raises(grpc.aio.AioRpcError) as exc:  # larger than the whole burst
        await stubs[0].Admit(_admit(ep, inp=50, out=500, **pt))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Pay-per-token endpoints are untouched.
    ppt = await stubs[0].Admit(_admit(other, [_rule(ENDPOINT, rpm=10)], out=50))
    assert ppt.requests.remaining == 9
    cap = await stubs[1].GetCapacity(pb.GetCapacityRequest(endpoint=ep))
    assert cap.provisioned_tokens_per_second == 100 and cap.in_flight_requests == 2
    assert cap.demand_tokens_per_second > cap.admitted_tokens_per_second > 0


# ---------------------------------------------------------------- attacks (zero trust)


async def test_attack_only_the_gateway_and_model_servers_may_admit(quota):
    for identity in ("routing", "envoy", "usage", "auth"):
        async with tls.aio_channel(quota[0][0], identity, "quota") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await quota_pb2_grpc.QuotaServiceStub(ch).Admit(_admit(_endpoint()))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("identity", ["embedding", "generation"])
async def test_attack_a_model_server_may_admit_and_nothing_else(quota, identity):
    async with tls.aio_channel(quota[0][0], identity, "quota") as ch:
        stub = quota_pb2_grpc.QuotaServiceStub(ch)
        rid = f"emb-{uuid.uuid4().hex}"
        out = await stub.AdmitMany(pb.AdmitManyRequest(admissions=[_admit(_endpoint(), rid=rid)]))
        assert out.outcomes[0].WhichOneof("outcome") == "admitted"
        for call in (stub.Settle(pb.SettleRequest(request_id=rid, endpoint="e", status_code=200)),
                     stub.SettleMany(pb.SettleManyRequest()),
                     stub.RenewLease(pb.RenewLeaseRequest(request_id=rid, endpoint="e")),
                     stub.GetCapacity(pb.GetCapacityRequest(endpoint="e"))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_attack_without_a_client_certificate_the_connection_fails(quota):
    with open(tls.files("gateway").ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(f.read())
    async with grpc.aio.secure_channel(
        quota[0][0], creds, options=[("grpc.ssl_target_name_override", "quota")]
    ) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await quota_pb2_grpc.QuotaServiceStub(ch).Admit(_admit(_endpoint()), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- Redis faults


class DurableRedis:
    """redis-server with an append-only file fsynced on every write, restartable on its port."""

    def __init__(self, tmp) -> None:
        self.dir, self.port, self.proc = tmp, free_port(), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--dir", str(self.dir), "--protected-mode", "no"],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.exceptions.RedisError:
                time.sleep(0.05)  # connection refused, or still loading the AOF
        raise RuntimeError("redis did not start")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def durable(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quota-aof")
    server = DurableRedis(tmp)
    server.start()
    sup = Supervisor(tmp / "logs")
    try:
        [addr] = _start_replicas(sup, tmp, server.url, 1)
        yield server, addr
    finally:
        sup.stop()
        if server.proc.poll() is None:
            server.kill()


async def test_redis_killed_mid_load_fails_closed_and_loses_no_settled_record(durable):
    # Fails without the append-only file. (SIGKILL loses what Redis had not written; what it
    # wrote but had not fsynced is lost only by a machine crash, which `appendfsync always`
    # covers and a test cannot stage.)
    server, addr = durable
    ep, settled, stop = _endpoint(), [], asyncio.Event()
    rules = [_rule(ENDPOINT, rpm=1_000_000)]
    async with tls.aio_channel(addr, "gateway", "quota") as ch:
        stub = quota_pb2_grpc.QuotaServiceStub(ch)

        async def client(k):
            for i in itertools.count():
                if stop.is_set():
                    return
                req = _admit(ep, rules, out=5, rid=f"{k}-{i}")
                try:
                    await stub.Admit(req, timeout=5)
                    done = await stub.Settle(pb.SettleRequest(
                        request_id=req.request_id, endpoint=ep, output_tokens=3), timeout=5)
                    settled.append(req.request_id)  # the gateway was told: it must be kept
                    assert not done.already_settled
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    await asyncio.sleep(0.05)

        clients = [asyncio.create_task(client(k)) for k in range(8)]
        await asyncio.sleep(0.7)
        server.kill()
        before = len(settled)
        assert before > 20
        # Redis down: nothing is admitted; the gateway gets a retry delay (its 503).
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Admit(_admit(ep, rules), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert from_rpc_error(err.value).retry_after == 1.0 and "Redis" in err.value.details()
        server.start()
        await asyncio.sleep(0.5)  # load resumes against the restarted Redis
        stop.set()
        await asyncio.gather(*clients)
    assert len(settled) > before
    db = redis.Redis.from_url(server.url, decode_responses=True)
    recorded = [r["request_id"] for r in _records(db, ep)]
    assert len(recorded) == len(set(recorded))
    assert set(settled) <= set(recorded)


async def test_a_usage_backlog_refuses_new_requests_and_drops_no_record(stubs, db):
    """The database is down (nothing drains the stream): past BACKLOG_MAX records, admission
    refuses with 503 and records nothing, admitted requests still settle and record, and
    admission resumes once the writer has caught up."""
    ep = _endpoint()
    stream = f"{PREFIX}:{{{ep}}}:usage"
    admitted = _admit(ep, inp=5, out=0)
    await stubs[0].Admit(admitted, timeout=5)
    for i in range(BACKLOG_MAX - db.xlen(stream)):  # what the writer could not write
        db.xadd(stream, {"request_id": f"old-{i}"})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs[1].Admit(_admit(ep, inp=5, out=0), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot be written to the database" in err.value.details()
    assert from_rpc_error(err.value).retry_after == 5.0
    assert db.xlen(stream) == BACKLOG_MAX  # the refusal is not recorded
    await stubs[1].Settle(pb.SettleRequest(request_id=admitted.request_id, endpoint=ep,
                                           output_tokens=0, status_code=200), timeout=5)
    assert db.xlen(stream) == BACKLOG_MAX + 1  # an admitted request's record is never dropped
    # The writer catches up: admission resumes.
    db.xtrim(stream, maxlen=0)
    resp = await stubs[0].Admit(_admit(ep, inp=5, out=0), timeout=5)
    assert resp.lease_expire_time_ms > 0
