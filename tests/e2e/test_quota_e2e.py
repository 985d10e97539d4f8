"""Quotas through Envoy: exact limits under concurrency, 429s a client can act on, rate-limit
headers, per-principal limits, settlement of cut streams, provisioned throughput.

Each test uses its own metered endpoint (tests/conftest.py), so budgets never mix.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from helpers.tiny_llm import LONG_GENERATION
from helpers.usage import records

LIMIT_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                 "x-ratelimit-reset-requests")


def token_for(http: httpx.Client, principal: str, endpoints=("*",)) -> str:
    r = http.post("/api/2.0/token/create",
                  json={"comment": f"quota {principal}", "principal": principal,
                        "endpoints": list(endpoints)})
    assert r.status_code == 200, r.text
    return r.json()["token_value"]


def embed(system, token: str, endpoint: str, text: str = "a small sentence") -> httpx.Response:
    return httpx.post(f"{system.base_url}/v1/embeddings", timeout=60,
                      headers={"authorization": f"Bearer {token}"},
                      json={"model": endpoint, "input": text})


def assert_429(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) > 0


def usage_records(system, endpoint: str) -> list[dict]:
    return records(system, endpoint)


def _embedded(system) -> float:
    """Inputs the embedding model has embedded, on every embedding replica."""
    return sum(system.metric(port.removesuffix("-metrics"), "fmapi_embedding_batch_size_sum")
               for port in system.ports
               if port.startswith("embedding") and port.endswith("-metrics"))


def test_a_request_limit_is_exact_under_200_concurrent_callers(system):
    """Endpoint ceiling of 30 requests a minute: 200 callers at once, exactly 30 get through."""
    limit, callers = 30, 200
    token = system.admin_token
    before = _embedded(system)

    async def main():
        limits = httpx.Limits(max_connections=callers, max_keepalive_connections=callers)
        async with httpx.AsyncClient(base_url=system.base_url, timeout=120, limits=limits,
                                     headers={"authorization": f"Bearer {token}"}) as c:
            go = asyncio.Event()

            async def one(i):
                await go.wait()
                return await c.post("/v1/embeddings", json={"model": "q-embed-ceiling",
                                                            "input": f"caller {i}"})

            tasks = [asyncio.create_task(one(i)) for i in range(callers)]
            t0 = time.monotonic()
            go.set()
            out = await asyncio.gather(*tasks)
            return out, time.monotonic() - t0

    responses, elapsed = asyncio.run(main())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    for r in refused:
        assert_429(r)
    # The bucket refills at limit/60 per second while the burst runs: at most that much more.
    assert limit <= len(ok) <= limit + int(elapsed * limit / 60) + 1, (len(ok), elapsed)
    # Admission comes before any model work: a refused request was never embedded.
    assert _embedded(system) - before == len(ok)
    deadline = time.monotonic() + 30  # the usage writer moves records to SQL within a second
    while len(records := usage_records(system, "q-embed-ceiling")) < callers:
        assert time.monotonic() < deadline, len(records)
        time.sleep(0.2)
    assert sum(u["status_code"] == "200" for u in records) == len(ok)
    assert sum(u["status_code"] == "429" for u in records) == len(refused)
    assert len({u["request_id"] for u in records}) == callers  # one record per request


def test_rate_limit_headers_and_the_sdk_waits_out_a_429(system):
    token = system.admin_token
    # 600 tokens a minute refill 10 a second: a request of ~40 tokens is not refilled by the
    # time the next one comes, even on a slow machine.
    counted = "one two three " * 12
    r = embed(system, token, "q-embed-retry", counted)
    assert r.status_code == 200, r.text
    first = int(r.headers["x-ratelimit-remaining-tokens"])
    assert int(r.headers["x-ratelimit-limit-tokens"]) == 600
    assert r.headers["x-ratelimit-reset-tokens"].endswith("s")
    r = embed(system, token, "q-embed-retry", counted)
    assert int(r.headers["x-ratelimit-remaining-tokens"]) < first
    # Spend the rest, then let the SDK (two retries by default) wait out the 429.
    text = "word " * 100
    while (r := embed(system, token, "q-embed-retry", text)).status_code == 200:
        pass
    assert_429(r)
    assert int(r.headers["retry-after-ms"]) <= 60_000
    sdk = openai.OpenAI(base_url=f"{system.base_url}/v1", api_key=token)  # default retries
    t0 = time.monotonic()
    out = sdk.embeddings.create(model="q-embed-retry", input=text)
    assert len(out.data[0].embedding) == 384
    assert time.monotonic() - t0 > 0.2  # it did wait


def test_principals_are_limited_apart_under_the_endpoint_ceiling(system, http):
    """Each principal gets 2 a minute; everyone together 5."""
    alice, bob, carol = (token_for(http, p) for p in ("alice", "bob", "carol"))
    assert [embed(system, alice, "q-embed-principals").status_code for _ in range(3)] == [200, 200, 429]
    # Alice being out does not touch Bob.
    assert [embed(system, bob, "q-embed-principals").status_code for _ in range(2)] == [200, 200]
    # The ceiling binds them together: Carol gets one (5 in all), then nobody.
    assert embed(system, carol, "q-embed-principals").status_code == 200
    r = embed(system, carol, "q-embed-principals")
    assert_429(r)


def test_a_named_override_beats_the_default(system, http):
    vip, dave = token_for(http, "vip"), token_for(http, "dave")
    assert [embed(system, vip, "q-embed-override").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert [embed(system, dave, "q-embed-override").status_code for _ in range(2)] == [200, 429]


def test_output_reservations_never_exceed_the_limit_and_unused_is_refunded(system, client):
    """100 output tokens a minute, 16 reserved per request: 6 fit at once, the 7th does not;
    after they finish the unused part of each reservation is back."""
    def chat(**kw):
        return client.with_raw_response.chat.completions.create(
            model="q-chat-tokens", messages=[{"role": "user", "content": "hi"}], **kw)

    first = chat(max_tokens=16, extra_body={"ignore_eos": True})
    assert int(first.headers["x-ratelimit-limit-tokens"]) == 100
    used = first.parse().usage.completion_tokens
    assert used == 16
    # A request that could never fit is a 400 naming max_tokens, not a 429.
    with pytest.raises(openai.BadRequestError) as err:
        chat(max_tokens=101)
    assert "max_tokens" in str(err.value)
    # Short answers: each reserves 16 and gives most back.
    r = chat(max_tokens=16, stop=["\n", " "], temperature=0)
    remaining = int(r.headers["x-ratelimit-remaining-tokens"])
    assert remaining <= 100 - 16 - 16 + 2  # both reservations held while the second ran
    time.sleep(0.3)  # settlement is asynchronous to the response
    probe = chat(max_tokens=1)
    generated = r.parse().usage.completion_tokens
    after = int(probe.headers["x-ratelimit-remaining-tokens"])
    # What is left is the limit minus what was really generated (and the probe's 1 reserved),
    # give or take the refill since the first request.
    assert after >= 100 - used - generated - 1 - 2


def test_a_stream_cut_by_its_client_is_settled_once_with_what_was_generated(system, client):
    stream = client.chat.completions.with_raw_response.create(
        model="q-chat-stream", messages=[{"role": "user", "content": "tell me a story"}],
        max_tokens=LONG_GENERATION, stream=True, extra_body={"ignore_eos": True})
    rid = stream.headers["x-request-id"]
    chunks = 0
    events = stream.parse()
    for _ in events:
        chunks += 1
        if chunks == 6:
            break
    events.close()
    deadline = time.monotonic() + 10
    while not (mine := [u for u in usage_records(system, "q-chat-stream") if u["request_id"] == rid]):
        assert time.monotonic() < deadline, "no usage record"
        time.sleep(0.1)
    time.sleep(0.5)
    mine = [u for u in usage_records(system, "q-chat-stream") if u["request_id"] == rid]
    assert len(mine) == 1
    record = mine[0]
    assert record["status_code"] == "499" and record["streaming"] in ("1", "true", "True")
    assert 4 <= int(record["output_tokens"]) < LONG_GENERATION
    assert int(record["input_tokens"]) > 0 and record["principal"] == "admin"


def test_provisioned_throughput_refuses_its_own_callers_only(system, client):
    """5 tokens a second (a 50-token burst): after one request of ~40 tokens a second must wait;
    pay-per-token traffic on the same model is untouched."""
    def pt():
        return client.with_raw_response.chat.completions.create(
            model="q-provisioned", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
            extra_body={"ignore_eos": True})

    assert pt().parse().usage.completion_tokens == 30
    with pytest.raises(openai.RateLimitError) as err:
        pt()
    assert err.value.response.headers["retry-after"]
    out = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4)
    assert out.usage.completion_tokens >= 1
