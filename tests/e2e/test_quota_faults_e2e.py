"""Metering when parts fail, through Envoy on a system of its own (these tests break it):
Redis unreachable fails closed; a gateway killed mid-stream leaves a reservation that its lease
settles, at its reserved size, exactly once."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from fmapi_cli.system import GenerationSpec, System, SystemOptions
from helpers.tiny_llm import TINY_ENGINE_ENV
from helpers.usage import records

ENDPOINTS = """
endpoints:
  - name: chat
    task: llm/v1/chat
    served_entities: [{model: tiny}]
    limits: {output_tokens_per_minute: 1000000}
  - name: embed
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits: {requests_per_minute: 1000}
"""
LEASE_SECONDS = 3
MAX_TOKENS = 1800  # the tiny model's context is 2048


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, tiny_model):
    run_dir = tmp_path_factory.mktemp("quota-faults")
    (run_dir / "endpoints.yaml").write_text(ENDPOINTS)
    s = System(SystemOptions(
        runtime_dir=run_dir, http_port=0, endpoints_file=run_dir / "endpoints.yaml",
        generation=[GenerationSpec("tiny", tiny_model, TINY_ENGINE_ENV)],
        env={"FMAPI_QUOTA_LEASE_SECONDS": str(LEASE_SECONDS)},
    ))
    s.start()
    yield s
    s.stop()


def _child(system, name):
    return next(c for c in system.sup.children if c.name == name)


def _records(system, endpoint: str) -> list[dict]:
    return records(system, endpoint)


def _headers(system) -> dict[str, str]:
    return {"authorization": f"Bearer {system.admin_token}"}


def test_redis_unreachable_fails_closed_with_503(faulty):
    url = f"{faulty.base_url}/v1/embeddings"
    body = {"model": "embed", "input": "hello"}
    assert httpx.post(url, json=body, headers=_headers(faulty), timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while not _records(faulty, "embed"):  # settlement follows the response
        assert time.monotonic() < deadline
        time.sleep(0.05)
    redis_proc = _child(faulty, "redis").proc
    os.kill(redis_proc.pid, signal.SIGSTOP)
    try:
        r = httpx.post(url, json=body, headers=_headers(faulty), timeout=30)
    finally:
        os.kill(redis_proc.pid, signal.SIGCONT)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] and r.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert "unavailable" in r.json()["error"]["message"]
    # Nothing ran unmetered. The refused request's admission may still have reached Redis once
    # it woke (the quota service had given up on it): then its record says 503, zero tokens.
    time.sleep(1.5)
    records = _records(faulty, "embed")
    assert [u["status_code"] for u in records][0] == "200"
    assert all(u["status_code"] == "503" and u["input_tokens"] == u["output_tokens"] == "0"
               for u in records[1:]) and len(records) <= 2, records
    assert httpx.post(url, json=body, headers=_headers(faulty), timeout=30).status_code == 200


def test_a_gateway_killed_mid_stream_is_settled_by_its_lease_once(faulty):
    # Long enough that the engine cannot finish (and the gateway settle normally) before the
    # kill lands, however slowly a busy machine lets this client read.
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": MAX_TOKENS, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=faulty.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body, headers=_headers(faulty)) as r:
            assert r.status_code == 200
            rid = r.headers["x-request-id"]
            lines = r.iter_lines()
            seen = 0
            for line in lines:
                seen += line.startswith("data:")
                if seen == 2:
                    break
            _child(faulty, "gateway").proc.kill()  # SIGKILL: no settlement from it
    deadline = time.monotonic() + LEASE_SECONDS + 10
    while not (mine := [u for u in _records(faulty, "chat") if u["request_id"] == rid]):
        assert time.monotonic() < deadline, "the lease never settled the reservation"
        time.sleep(0.2)
    time.sleep(2)  # every quota reaper has had its turn
    mine = [u for u in _records(faulty, "chat") if u["request_id"] == rid]
    assert len(mine) == 1
    assert mine[0]["expired"] == "1" and int(mine[0]["output_tokens"]) == MAX_TOKENS
