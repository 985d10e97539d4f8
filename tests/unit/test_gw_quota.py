"""The gateway's side of metering: which limits apply, what a body may attach, settlement once,
lease renewal while a request runs."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from fmapi.quota.v1 import quota_pb2 as pb
from fmapi.routing.v1 import routing_pb2
from fmapi_common.coalesce import Coalescer
from fmapi_common.errors import (
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    rich_status,
    to_rpc_status,
)
from fmapi_common.identity import Identity
from fmapi_gateway.quota import Quota, UsageTags, rules


def limits(**kw) -> routing_pb2.Limits:
    return routing_pb2.Limits(**kw)


def test_rules_the_ceiling_and_the_principal_default_or_its_override():
    lim = limits(requests_per_minute=2, endpoint={"requests_per_minute": 5},
                 principals=[{"principal": "vip", "limits": {"requests_per_minute": 9}}])
    assert [(r.key, r.requests_per_minute) for r in rules(lim, "alice")] == [
        (pb.LIMIT_KEY_ENDPOINT, 5), (pb.LIMIT_KEY_PRINCIPAL, 2)]
    assert [(r.key, r.requests_per_minute) for r in rules(lim, "vip")] == [
        (pb.LIMIT_KEY_ENDPOINT, 5), (pb.LIMIT_KEY_PRINCIPAL, 9)]
    assert rules(limits(), "alice") == []  # nothing declared: nothing limited (still metered)


@pytest.mark.parametrize("body, param", [
    ({"client_request_id": 7}, "client_request_id"),
    ({"client_request_id": "x" * 129}, "client_request_id"),
    ({"usage_context": "team-a"}, "usage_context"),
    ({"usage_context": {"team": {"nested": 1}}}, "usage_context"),
])
def test_bad_usage_tags_are_400s(body, param):
    with pytest.raises(InvalidArgument) as err:
        UsageTags.from_body("rid", body)
    assert err.value.param == param


def test_usage_tags_from_a_databricks_body():
    tags = UsageTags.from_body("rid", {"client_request_id": "c-1",
                                       "usage_context": {"team": "a", "cost_center": 42}})
    assert tags == UsageTags("rid", "c-1", {"team": "a", "cost_center": "42"})


class FakeStub:
    def __init__(self) -> None:
        self.renewed: list[str] = []
        self.settled: list[pb.SettleRequest] = []
        self.calls: list[int] = []  # settlements per SettleMany call
        self.gate = asyncio.Event()  # SettleMany answers once set
        self.gate.set()
        self.admit_calls: list[int] = []  # admissions per AdmitMany call
        self.admit_gate = asyncio.Event()
        self.admit_gate.set()

    async def Admit(self, req, timeout):  # noqa: N802 - gRPC method name
        return pb.AdmitResponse(lease_remaining_ms=1500,
                                requests=pb.RateLimit(limit=10, remaining=9, reset_ms=6000))

    async def AdmitMany(self, req, timeout):  # noqa: N802
        self.admit_calls.append(len(req.admissions))
        await self.admit_gate.wait()
        out = []
        for r in req.admissions:
            if r.request_id.startswith("refuse"):
                err = ResourceExhausted("rate limit exceeded on endpoint 'ep'", retry_after=2.5)
                out.append(pb.AdmitOutcome(refused=rich_status(err).SerializeToString()))
            else:
                out.append(pb.AdmitOutcome(admitted=await self.Admit(r, timeout)))
        return pb.AdmitManyResponse(outcomes=out)

    async def RenewLease(self, req, timeout):  # noqa: N802
        self.renewed.append(req.request_id)

    async def SettleMany(self, req, timeout):  # noqa: N802
        self.calls.append(len(req.settlements))
        await self.gate.wait()
        self.settled.extend(req.settlements)
        return pb.SettleManyResponse(outcomes=[
            pb.SettleOutcome(result=pb.SettleOutcome.RESULT_SETTLED)] * len(req.settlements))


def _fake(q: Quota) -> FakeStub:
    """``q`` talking to a fake quota service (its admissions and its other calls)."""
    stub = q._stub = q._admitter._stub = FakeStub()
    return stub


async def test_a_long_request_renews_its_lease_until_settled_once():
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)
    endpoint = routing_pb2.Endpoint(name="ep", limits=limits(requests_per_minute=10))
    caller = Identity(principal="alice", workspace="w", token_id="t")
    meter = await q.admit(tags=UsageTags("rid"), endpoint=endpoint, model="m", caller=caller,
                          input_tokens=3, output_tokens=5, streaming=True, input_param="messages")
    assert meter.headers["x-ratelimit-remaining-requests"] == "9"
    assert meter.headers["x-ratelimit-reset-requests"] == "6s"
    await asyncio.sleep(2.3)  # renewed every 1 s (a third of 1.5 s, at least 1 s)
    assert stub.renewed.count("rid") >= 1
    meter.first_token()
    meter.settle(output_tokens=5, status_code=200, finish_reason="stop")
    meter.settle(output_tokens=9, status_code=499)  # a second end changes nothing
    renewed = len(stub.renewed)
    await asyncio.sleep(1.3)
    assert len(stub.renewed) == renewed  # no renewal after settlement
    assert [(s.output_tokens, s.status_code) for s in stub.settled] == [(5, 200)]
    await q.close()


async def test_settlements_that_queue_behind_a_call_in_flight_go_in_one_call():
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)
    stub.gate.clear()  # the first call hangs until released
    first = asyncio.create_task(q.settle(pb.SettleRequest(request_id="r0", endpoint="ep")))
    await asyncio.sleep(0.05)
    assert stub.calls == [1]  # nothing waits when nothing is in flight
    rest = [asyncio.create_task(q.settle(pb.SettleRequest(request_id=f"r{i}", endpoint="ep")))
            for i in range(1, 301)]
    await asyncio.sleep(0.05)
    assert stub.calls == [1] and not first.done()  # one call in flight at a time
    stub.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), 5)
    assert stub.calls == [1, 256, 44]  # at most 256 per call
    assert [s.request_id for s in stub.settled] == [f"r{i}" for i in range(301)]
    await q.close()


async def test_a_settlement_lingers_for_company_but_those_queued_behind_a_call_do_not():
    q = Quota("127.0.0.1:1", None, settle_linger=0.3)
    stub = _fake(q)
    first = [asyncio.create_task(q.settle(pb.SettleRequest(request_id=f"a{i}", endpoint="ep")))
             for i in range(2)]
    await asyncio.sleep(0.1)
    first.append(asyncio.create_task(q.settle(pb.SettleRequest(request_id="a2", endpoint="ep"))))
    await asyncio.sleep(0.1)
    assert stub.calls == []  # nothing in flight: the first waits for company
    stub.gate.clear()  # the lingered call will hang until released
    await asyncio.sleep(0.25)
    assert stub.calls == [3]  # one call, 0.3 s after the first settlement
    behind = [asyncio.create_task(q.settle(pb.SettleRequest(request_id=f"b{i}", endpoint="ep")))
              for i in range(2)]
    await asyncio.sleep(0.05)
    stub.gate.set()
    # Those that queued behind the call waited already: theirs goes when it answers.
    await asyncio.wait_for(asyncio.gather(*first, *behind), 0.2)
    assert stub.calls == [3, 2]
    assert [s.request_id for s in stub.settled] == ["a0", "a1", "a2", "b0", "b1"]
    await q.close()


async def test_an_item_withdrawn_while_its_call_lingers_is_never_sent():
    sent: list[list[str]] = []

    async def call(items):
        sent.append(items)
        return items

    c = Coalescer(call, max_count=8, max_bytes=1024, size=len, withdraw=True, linger=0.2)
    gone = asyncio.create_task(c.submit("gone"))
    await asyncio.sleep(0.05)
    gone.cancel()
    kept = asyncio.create_task(c.submit("kept"))
    assert await asyncio.wait_for(kept, 1) == "kept"
    assert sent == [["kept"]]
    alone = Coalescer(call, max_count=8, max_bytes=1024, size=len, withdraw=True, linger=0.1)
    lone = asyncio.create_task(alone.submit("lone"))
    await asyncio.sleep(0.02)
    lone.cancel()
    await asyncio.sleep(0.2)  # the wait ended with nothing left: no call at all
    assert sent == [["kept"]]
    with pytest.raises(ValueError):
        Coalescer(call, max_count=8, max_bytes=1024, size=len, linger=-1)


async def test_an_item_brings_its_own_linger_and_a_flush_or_a_hurried_item_ends_the_wait():
    sent: list[list[str]] = []

    async def call(items):
        sent.append(items)
        return items

    c = Coalescer(call, max_count=8, max_bytes=1024, size=len)  # by default, no wait
    assert await asyncio.wait_for(c.submit("now"), 1) == "now"
    waiting = [asyncio.create_task(c.submit(x, linger=5)) for x in ("a", "b")]
    await asyncio.sleep(0.1)
    assert sent == [["now"]]  # they wait for company
    c.flush()
    assert await asyncio.wait_for(asyncio.gather(*waiting), 1) == ["a", "b"]
    assert sent == [["now"], ["a", "b"]]  # in one call, long before their 5 s
    waiting = asyncio.create_task(c.submit("c", linger=5))
    await asyncio.sleep(0.1)
    # An item that may not wait so long ends the wait: it goes with the one that waited.
    assert await asyncio.wait_for(c.submit("d", linger=0.01), 1) == "d"
    assert await asyncio.wait_for(waiting, 1) == "c"
    assert sent[-1] == ["c", "d"]
    c.flush()  # nothing waits: nothing happens
    await asyncio.sleep(0.05)
    assert len(sent) == 3
    with pytest.raises(ValueError):
        await c.submit("bad", linger=11)
    assert len(sent) == 3 and not c._queue
    # A flush that comes before the waiting call's task has even started is not lost.
    early = asyncio.create_task(c.submit("e", linger=5))
    await asyncio.sleep(0)  # "e" is queued; its call's task is created, not yet started
    c.flush()
    assert await asyncio.wait_for(early, 1) == "e"


async def test_a_failed_settlement_call_answers_every_caller_and_the_next_one_goes_out():
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)
    good = stub.SettleMany

    async def down_once(req, timeout):
        stub.SettleMany = good
        raise Down()

    stub.SettleMany = down_once
    # The callers of a failed call return (their leases settle them): nobody hangs.
    await asyncio.wait_for(asyncio.gather(*(q.settle(pb.SettleRequest(
        request_id=f"lost{i}", endpoint="ep")) for i in range(3))), 5)
    await asyncio.wait_for(q.settle(pb.SettleRequest(request_id="next", endpoint="ep")), 5)
    # lost0 went alone (nothing was in flight) and its call failed; the others went next.
    assert [s.request_id for s in stub.settled] == ["lost1", "lost2", "next"]
    await q.close()


def _admit(q: Quota, rid: str):
    return q.admit(tags=UsageTags(rid), endpoint=routing_pb2.Endpoint(name="ep"), model="m",
                   caller=Identity(principal="alice", workspace="w", token_id="t"),
                   input_tokens=3, output_tokens=0, streaming=False, input_param="input")


async def test_admissions_that_queue_behind_a_call_go_in_one_and_are_answered_each():
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)
    stub.admit_gate.clear()
    first = asyncio.create_task(_admit(q, "a0"))
    await asyncio.sleep(0.05)
    assert stub.admit_calls == [1]  # nothing waits when nothing is in flight
    queued = [asyncio.create_task(_admit(q, rid)) for rid in ("a1", "refuse-2", "a3")]
    gone = asyncio.create_task(_admit(q, "a4"))
    await asyncio.sleep(0.05)
    gone.cancel()  # its caller went away before it was sent: never sent
    await asyncio.sleep(0)
    stub.admit_gate.set()
    got = await asyncio.wait_for(asyncio.gather(first, *queued, return_exceptions=True), 5)
    assert stub.admit_calls == [1, 3]
    assert [m.headers["x-ratelimit-remaining-requests"] for m in (got[0], got[1], got[3])] == \
        ["9"] * 3
    refused = got[2]
    assert isinstance(refused, ResourceExhausted) and refused.retry_after == 2.5
    assert "rate limit exceeded" in refused.message
    await q.close()
    # Only the cancelled one is closed at once (a refusal charged nothing and needs no closing).
    assert [(s.request_id, s.status_code) for s in stub.settled] == [("a4", 499)]


async def test_a_quota_service_without_admit_many_gets_one_admit_each():
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)

    async def admit_many(req, timeout):
        raise Unimplemented()

    async def admit(req, timeout):
        if req.request_id == "refuse":
            raise FakeRefusal(ResourceExhausted("slow down", retry_after=1.5))
        return pb.AdmitResponse(lease_remaining_ms=1500)

    stub.AdmitMany, stub.Admit = admit_many, admit
    ok, refused = await asyncio.gather(_admit(q, "fine"), _admit(q, "refuse"),
                                       return_exceptions=True)
    assert ok.request_id == "fine"
    assert isinstance(refused, ResourceExhausted) and refused.retry_after == 1.5
    await q.close()


class FakeRefusal(grpc.aio.AioRpcError):
    """A failed Admit as the quota service sends it (its rich status in the trailers)."""

    def __init__(self, err) -> None:
        status = to_rpc_status(err)
        super().__init__(status.code, grpc.aio.Metadata(),
                         grpc.aio.Metadata(*status.trailing_metadata), details=status.details)


class Unimplemented(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                         details="Method not found!")


async def test_a_quota_service_without_settle_many_gets_one_settle_each():
    """A rolling upgrade: the new gateway meets a quota service older than SettleMany."""
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)
    one_by_one = []

    async def settle_many(req, timeout):
        raise Unimplemented()

    async def settle(req, timeout):
        one_by_one.append(req.request_id)

    stub.SettleMany, stub.Settle = settle_many, settle
    await asyncio.wait_for(asyncio.gather(*(q.settle(pb.SettleRequest(
        request_id=f"r{i}", endpoint="ep")) for i in range(3))), 5)
    assert sorted(one_by_one) == ["r0", "r1", "r2"]
    await q.close()


async def test_a_settlement_too_big_to_share_a_call_goes_alone():
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)
    stub.gate.clear()
    big = pb.SettleRequest(request_id="big", endpoint="ep", payload=pb.Payload(
        request_json="x" * (3 * 2**20)))

    def small(i):
        return pb.SettleRequest(request_id=f"small{i}", endpoint="ep")

    first = asyncio.create_task(q.settle(small(0)))
    await asyncio.sleep(0.05)  # in flight; the rest queue up behind it
    rest = [asyncio.create_task(q.settle(r)) for r in (big, small(1), small(2))]
    await asyncio.sleep(0.05)
    stub.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), 5)
    assert stub.calls == [1, 1, 2]  # over 2 MiB together: the big one went alone
    assert [s.request_id for s in stub.settled] == ["small0", "big", "small1", "small2"]
    await q.close()


class Down(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                         details="connection refused")


async def test_an_unreachable_quota_service_refuses_and_closes_the_admission():
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)

    async def admit(req, timeout):
        raise Down()

    stub.AdmitMany = admit
    endpoint = routing_pb2.Endpoint(name="ep")
    caller = Identity(principal="alice", workspace="w", token_id="t")
    with pytest.raises(Unavailable) as err:
        await q.admit(tags=UsageTags("rid"), endpoint=endpoint, model="m", caller=caller,
                      input_tokens=3, output_tokens=0, streaming=False, input_param="input")
    assert "metering is unavailable" in err.value.message and err.value.retry_after == 1.0
    await q.close()  # waits for the settlement in flight
    # Its answer may have been lost after the admission ran: it is closed at once.
    assert [(s.request_id, s.status_code) for s in stub.settled] == [("rid", 503)]


def test_a_grpc_request_is_kept_as_json_only_when_its_payload_is_taken():
    import json

    from fmapi.inference.v1 import inference_pb2
    from fmapi_gateway.quota import MAX_PAYLOAD_BYTES, _payload_json

    text, code = _payload_json(inference_pb2.EmbedRequest(endpoint="e", texts=["hi"]), "TOO_LARGE")
    assert json.loads(text) == {"endpoint": "e", "texts": ["hi"]} and code == ""
    big = inference_pb2.EmbedRequest(endpoint="e", texts=["x" * MAX_PAYLOAD_BYTES])
    assert _payload_json(big, "TOO_LARGE") == ("", "TOO_LARGE")


def test_served_entities_with_the_same_name_are_a_400():
    from fmapi_common.errors import InvalidArgument
    from fmapi_gateway.serving_endpoints import served_config

    with pytest.raises(InvalidArgument) as err:
        served_config({"served_entities": [{"entity_name": "m", "name": "a"},
                                           {"entity_name": "n", "name": "a"}],
                       "traffic_config": {"routes": [{"served_entity_name": "a",
                                                      "traffic_percentage": 100}]}})
    assert err.value.param == "config.served_entities" and "unique" in err.value.message


def test_users_and_service_principals_each_get_their_own_default_when_the_endpoint_has_one():
    yaml_style = limits(requests_per_minute=2)  # one default for every principal
    assert [r.requests_per_minute for r in rules(yaml_style, "app-1", "service_principal")] == [2]
    own = limits(requests_per_minute=2, service_principal_default={"requests_per_minute": 30})
    assert [r.requests_per_minute for r in rules(own, "app-1", "service_principal")] == [30]
    assert [r.requests_per_minute for r in rules(own, "alice", "user")] == [2]
    none = limits(requests_per_minute=2, service_principal_default={})
    assert rules(none, "app-1", "service_principal") == []  # users only: service principals free


def _round_trip(entries: list[dict]) -> list[dict]:
    """What ``GET`` shows after ``PUT .../ai-gateway`` with ``rate_limits=entries``, the update
    merged the way the routing registry merges it."""
    from google.protobuf import field_mask_pb2

    from fmapi_common.endpoints import from_pb, to_pb
    from fmapi_gateway.serving_endpoints import ai_gateway, render_ai_gateway

    stored = routing_pb2.Endpoint(name="e", task=routing_pb2.TASK_EMBEDDINGS,
                                  served_entities=[{"name": "m", "model": "m",
                                                    "traffic_percentage": 100}],
                                  limits={"requests_per_minute": 4})  # as the YAML gives it
    update, paths = ai_gateway({"rate_limits": entries})
    field_mask_pb2.FieldMask(paths=paths).MergeMessage(update, stored, True, True)
    return render_ai_gateway(to_pb(from_pb(stored)))["rate_limits"]


@pytest.mark.parametrize("entries", [
    [{"key": "user", "calls": 5, "renewal_period": "minute"}],
    [{"key": "service_principal", "tokens": 70, "renewal_period": "minute"}],
    [{"key": "user", "calls": 5, "renewal_period": "minute"},
     {"key": "service_principal", "calls": 9, "renewal_period": "minute"}],
    [{"key": "endpoint", "calls": 50, "renewal_period": "minute"},
     {"key": "service_principal", "principal": "app-1", "calls": 8, "renewal_period": "minute"},
     {"key": "user", "principal": "alice", "calls": 7, "renewal_period": "minute"}],
])
def test_rate_limits_read_back_as_they_were_put(entries):
    assert _round_trip(entries) == entries


def test_two_defaults_for_one_key_are_a_400():
    from fmapi_gateway.serving_endpoints import ai_gateway

    with pytest.raises(InvalidArgument) as err:
        ai_gateway({"rate_limits": [{"key": "user", "calls": 1}, {"key": "user", "calls": 2}]})
    assert err.value.param == "ai_gateway.rate_limits[1]" and "two default" in err.value.message


def test_a_rate_limit_without_a_key_is_the_endpoints_as_in_the_managed_product():
    assert _round_trip([{"calls": 5}]) == [{"key": "endpoint", "calls": 5,
                                             "renewal_period": "minute"}]


# ------------------------------------------- embeddings: admitted by the embedding server


class _EmbeddingServer:
    """Stands in for one embedding server (the gateway's side of the call): ``admits`` says
    whether it honours the admission the request carries, as current servers do, or ignores it,
    as one older than admissions would; ``fail`` makes the call fail with that error."""

    def __init__(self, admits: bool, fail: Exception | None = None) -> None:
        self.admits, self.fail, self.calls = admits, fail, []

    async def embed(self, address, request, cap):
        from fmapi.embedding.v1 import embedding_pb2

        self.calls.append(type(request).FromString(request.SerializeToString()))  # as sent
        if self.fail is not None:
            raise self.fail
        resp = embedding_pb2.EmbedResponse(embeddings=[{"values": [0.6, 0.8]}], input_tokens=11,
                                           model=request.model)
        if self.admits:
            resp.admission.CopyFrom(pb.AdmitResponse(
                lease_remaining_ms=1500, requests=pb.RateLimit(limit=10, remaining=4, reset_ms=1)))
        return resp


async def _embed_through(server: _EmbeddingServer, quota: Quota, rid: str = "rid-e"):
    from fmapi_common.router import Resolution
    from fmapi_gateway.backends import Backends
    from fmapi_gateway.embeddings import embed

    endpoint = routing_pb2.Endpoint(name="ep", task=routing_pb2.TASK_EMBEDDINGS,
                                    limits=limits(requests_per_minute=10))
    backends = Backends.__new__(Backends)  # no channels: only what embed() calls
    backends.quota, backends.idle_timeout, backends.request_timeout = quota, 5.0, 30.0
    backends._down = {}

    async def resolve(name):
        return Resolution(endpoint, "m", routing_pb2.Replica(address="127.0.0.1:1"))

    backends.resolve, backends.embed = resolve, server.embed
    return await embed(backends, Identity(principal="alice", workspace="w", token_id="t",
                                          scopes=("*",)), "ep", ["hello world"],
                       UsageTags(rid))


async def test_an_embedding_is_admitted_by_its_server_with_no_call_from_the_gateway():
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)
    server = _EmbeddingServer(admits=True)
    out = await _embed_through(server, q)
    sent = server.calls[0].admission
    assert sent.request_id == "rid-e" and sent.endpoint == "ep" and sent.input_tokens == 0
    assert [r.requests_per_minute for r in sent.rules] == [10]
    assert stub.admit_calls == []  # the server admitted it
    assert out.headers["x-ratelimit-remaining-requests"] == "4"
    await q.close()
    assert [(s.request_id, s.status_code, s.input_tokens) for s in stub.settled] == [
        ("rid-e", 200, 11)]


async def test_an_embedding_server_that_ignores_the_admission_is_admitted_on_its_exact_count():
    # An embedding server older than admissions (a rolling upgrade): the gateway admits the
    # request itself, on the count the response carries, before anyone sees the result.
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)
    admitted = []

    async def admit(req, timeout):  # AdmitMany's admissions (refused: ids "refuse...")
        admitted.append(req.input_tokens)
        return pb.AdmitResponse(lease_remaining_ms=1500)

    stub.Admit = admit
    out = await _embed_through(_EmbeddingServer(admits=False), q)
    assert admitted == [11] and out.input_tokens == 11
    with pytest.raises(ResourceExhausted):  # refused: the vectors never reach the caller
        await _embed_through(_EmbeddingServer(admits=False), q, rid="refuse-1")
    await q.close()


@pytest.mark.parametrize("error, closed", [
    (Unavailable("the embedding server failed"), True),  # it may have been admitted
    (ResourceExhausted("rate limit exceeded", retry_after=1.0), False),  # refused: nothing held
    (InvalidArgument("input[0] is empty", param="input"), False),  # refused before admission
])
async def test_a_failed_embedding_is_closed_only_when_it_may_have_been_admitted(error, closed):
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)
    with pytest.raises(type(error)):
        await _embed_through(_EmbeddingServer(admits=True, fail=error), q)
    await q.close()
    assert [(s.request_id, s.finish_reason) for s in stub.settled] == (
        [("rid-e", "not_run")] if closed else [])


# ------------------------------------------- generation: admitted by the generation server


class _Stream:
    """One Generate stream as the gateway reads it."""

    def __init__(self, messages) -> None:
        self.messages, self.cancelled = list(messages), False

    async def read(self):
        return self.messages.pop(0) if self.messages else grpc.aio.EOF

    def cancel(self) -> None:
        self.cancelled = True


def _generation_messages(admits: bool):
    from fmapi.generation.v1 import generation_pb2 as gpb

    accepted = gpb.GenerateResponse()
    if admits:
        accepted.admission.CopyFrom(gpb.Admission(
            response=pb.AdmitResponse(lease_remaining_ms=1500,
                                      tokens=pb.RateLimit(limit=100, remaining=60, reset_ms=1)),
            input_tokens=9, reserved_output_tokens=5))
    return [accepted, gpb.GenerateResponse(choices=[{"index": 0, "text": "hi", "num_tokens": 2,
                                                     "finish_reason": 1}]),
            gpb.GenerateResponse(usage={"prompt_tokens": 9, "completion_tokens": 2})]


async def _generate_through(monkeypatch, servers: list[bool], quota: Quota):
    """A one-prompt chat call through ``start``; ``servers`` says, per stream opened, whether its
    model server honours the admission. Returns (run, streams opened, requests sent, counts)."""
    from fmapi.generation.v1 import generation_pb2 as gpb
    from fmapi_common.router import Resolution
    from fmapi_gateway import generation
    from fmapi_gateway.backends import Backends
    from fmapi_gateway.openai_generation import GenerationCall

    endpoint = routing_pb2.Endpoint(name="chat", task=routing_pb2.TASK_CHAT,
                                    limits=limits(tokens_per_minute=100))
    backends = Backends.__new__(Backends)
    backends.quota, backends.idle_timeout, backends.request_timeout = quota, 5.0, 30.0
    backends._down = {}
    opened, sent, counted = [], [], []

    async def resolve(name):
        return Resolution(endpoint, "tiny", routing_pb2.Replica(address="127.0.0.1:1"))

    async def count(address, requests):
        counted.append(len(requests))
        return [gpb.TokenCount(prompt_tokens=9, max_output_tokens=5)]

    def open_stream(backends_, address, request, cap):
        sent.append(type(request).FromString(request.SerializeToString()))
        opened.append(_Stream(_generation_messages(servers[len(opened)])))
        return opened[-1]

    backends.resolve, backends.count_generation_tokens = resolve, count
    monkeypatch.setattr(generation, "open_generation", open_stream)
    call = GenerationCall(endpoint="chat", requests=[gpb.GenerateRequest(
        chat=gpb.Chat(messages=[gpb.ChatMessage(role="user", content="hello")]),
        sampling=gpb.SamplingParams(max_tokens=5))], stream=True, include_usage=False, n=1,
        logprobs=False, chat=True, max_tokens_given=True)
    run = await generation.start(backends, Identity(principal="alice", workspace="w",
                                                    token_id="t", scopes=("*",)),
                                 call, UsageTags("rid-g"))
    return run, opened, sent, counted


async def test_a_chat_is_admitted_by_its_generation_server_with_no_count_call(monkeypatch):
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)
    run, opened, sent, counted = await _generate_through(monkeypatch, [True], q)
    assert counted == [] and stub.admit_calls == []  # no CountTokens, no admission here
    assert sent[0].admission.request_id == "rid-g" and sent[0].admission.streaming
    assert run.meter.headers["x-ratelimit-remaining-tokens"] == "60"
    assert [e.delta.text async for e in run.events()] == ["hi"]
    run.close(200)
    await q.close()
    assert [(s.request_id, s.output_tokens, s.status_code) for s in stub.settled] == [
        ("rid-g", 2, 200)]


async def test_a_generation_server_that_ignores_the_admission_is_stopped_counted_and_restarted(
        monkeypatch):
    # A generation server older than admissions (a rolling upgrade) started the engine without
    # admitting: the gateway stops that stream before reading any output, counts, admits, and
    # starts again without the admission.
    q = Quota("127.0.0.1:1", None)
    stub = _fake(q)
    run, opened, sent, counted = await _generate_through(monkeypatch, [False, False], q)
    assert opened[0].cancelled and not opened[1].cancelled
    assert counted == [1] and stub.admit_calls == [1]
    assert sent[0].HasField("admission") and not sent[1].HasField("admission")
    assert [e.delta.text async for e in run.events()] == ["hi"]
    run.close(200)
    await q.close()
    assert [s.request_id for s in stub.settled] == ["rid-g"]
