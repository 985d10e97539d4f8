"""The gateway's side of metering: which limits apply, what a body may attach, settlement once,
lease renewal while a request runs."""

from __future__ import annotations

import asyncio
import time

import pytest

from fmapi.quota.v1 import quota_pb2 as pb
from fmapi.routing.v1 import routing_pb2
from fmapi_common.errors import InvalidArgument
from fmapi_gateway.quota import Meter, UsageTags, rules


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


class FakeQuota:
    def __init__(self) -> None:
        self.renewed: list[str] = []
        self.settled: list[pb.SettleRequest] = []
        self.tasks: list[asyncio.Task] = []

    def spawn(self, coro):
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        return task

    keep = spawn

    async def renew(self, request_id: str, endpoint: str) -> None:
        self.renewed.append(request_id)

    async def settle(self, req: pb.SettleRequest) -> None:
        self.settled.append(req)


async def test_a_long_request_renews_its_lease_until_settled_once():
    q = FakeQuota()
    admitted = pb.AdmitResponse(lease_remaining_ms=1000,
                                requests=pb.RateLimit(limit=10, remaining=9, reset_ms=6000))
    meter = Meter(q, "rid", "ep", admitted, time.monotonic())  # renews every ~0.33 s
    assert meter.headers["x-ratelimit-remaining-requests"] == "9"
    assert meter.headers["x-ratelimit-reset-requests"] == "6s"
    await asyncio.sleep(0.8)
    assert len(q.renewed) >= 2
    meter.first_token()
    meter.settle(output_tokens=5, status_code=200, finish_reason="stop")
    meter.settle(output_tokens=9, status_code=499)  # a second end changes nothing
    await asyncio.gather(*q.tasks, return_exceptions=True)
    renewed = len(q.renewed)
    await asyncio.sleep(0.5)
    assert len(q.renewed) == renewed  # no renewal after settlement
    assert [(s.output_tokens, s.status_code) for s in q.settled] == [(5, 200)]
