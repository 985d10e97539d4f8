"""Limits stay exact across replicas: 200 concurrent callers through Envoy, balanced over two
gateways that each admit through their own quota replica, against one Redis. Token buckets refill
continuously (limit/60 per second), so "exact" is: never more than the limit plus what refilled
while the burst ran, never fewer than the limit."""

from __future__ import annotations

import asyncio
import time

import httpx

CALLERS = 200


def burst(system, path: str, body: dict) -> tuple[list[httpx.Response], float]:
    """CALLERS requests released at once; their responses and how long the burst took."""

    async def main():
        limits = httpx.Limits(max_connections=CALLERS, max_keepalive_connections=CALLERS)
        async with httpx.AsyncClient(base_url=system.base_url, timeout=120, limits=limits,
                                     headers={"authorization": f"Bearer {system.admin_token}"}) as c:
            go = asyncio.Event()

            async def one():
                await go.wait()
                return await c.post(path, json=body)

            tasks = [asyncio.create_task(one()) for _ in range(CALLERS)]
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            go.set()
            out = await asyncio.gather(*tasks)
            return out, time.monotonic() - t0

    return asyncio.run(main())


def _split(responses):
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert all(r.status_code == 429 and r.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
               for r in refused), {r.status_code for r in refused}
    return ok, refused


def _both_quota_replicas_admitted(system, before: dict[str, float]) -> None:
    for q in ("quota", "quota-2"):
        admitted = system.metric(q, "fmapi_grpc_server_started_total", grpc_method="AdmitMany")
        assert admitted > before[q], q


def _admits(system) -> dict[str, float]:
    return {q: system.metric(q, "fmapi_grpc_server_started_total", grpc_method="AdmitMany")
            for q in ("quota", "quota-2")}


def test_a_request_limit_is_exact_across_replicas(replicated):
    limit = 40
    before = _admits(replicated)
    responses, elapsed = burst(replicated, "/v1/embeddings",
                               {"model": "x-requests", "input": "a small sentence"})
    ok, refused = _split(responses)
    assert limit <= len(ok) <= limit + int(elapsed * limit / 60) + 1, (len(ok), elapsed)
    _both_quota_replicas_admitted(replicated, before)


def test_an_input_token_limit_is_exact_across_replicas(replicated):
    limit, text = 300, "a small sentence"
    probe = httpx.post(f"{replicated.base_url}/v1/embeddings", timeout=60,
                       headers={"authorization": f"Bearer {replicated.admin_token}"},
                       json={"model": "all-minilm-l6-v2", "input": text})
    per_request = probe.json()["usage"]["prompt_tokens"]
    responses, elapsed = burst(replicated, "/v1/embeddings", {"model": "x-input", "input": text})
    ok, _ = _split(responses)
    admitted = len(ok) * per_request
    refilled = elapsed * limit / 60
    assert admitted <= limit + refilled + per_request, (admitted, elapsed)
    assert admitted > limit - per_request, admitted  # nothing left unused either


def test_an_output_token_limit_reserves_and_refunds_exactly_across_replicas(replicated):
    limit, reserve = 240, 12  # default_max_tokens 12: each request reserves 12
    t_start = time.monotonic()
    responses, elapsed = burst(replicated, "/v1/chat/completions", {
        "model": "x-output", "messages": [{"role": "user", "content": "hi"}]})
    ok, _ = _split(responses)
    assert limit // reserve <= len(ok) <= limit // reserve + int(elapsed * limit / 60 / reserve) + 1
    generated = sum(r.json()["usage"]["completion_tokens"] for r in ok)
    assert generated <= len(ok) * reserve
    time.sleep(1.0)  # settlements follow the responses
    probe = httpx.post(f"{replicated.base_url}/v1/chat/completions", timeout=60,
                       headers={"authorization": f"Bearer {replicated.admin_token}"},
                       json={"model": "x-output", "max_tokens": 1,
                             "messages": [{"role": "user", "content": "probe"}]})
    assert probe.status_code == 200, probe.text
    remaining = int(probe.headers["x-ratelimit-remaining-tokens"])
    since = time.monotonic() - t_start
    # What is left is the limit minus what was really generated (not what was reserved) and the
    # probe's own reservation, plus at most what refilled since the burst began.
    expected = limit - generated - 1
    assert expected - 1 <= remaining <= min(limit, expected + since * limit / 60 + 1), (
        remaining, expected, since)
