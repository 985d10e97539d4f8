"""Checks shared by the usage tests on SQLite (the session's system) and on PostgreSQL."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import sqlalchemy as sa

from helpers.tiny_llm import LONG_GENERATION


def rows(url: str, where: str = "1=1", **params) -> list[dict]:
    """endpoint_usage rows straight from the database."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(
                sa.text(f"SELECT * FROM endpoint_usage WHERE {where}"), params)]
    finally:
        engine.dispose()


def wait_rows(url: str, tag: str, n: int, timeout: float = 30.0) -> list[dict]:
    """The rows whose client_request_id starts with ``tag``, once there are ``n`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = rows(url, "client_request_id LIKE :t", t=f"{tag}%")
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def mixed_requests(http: httpx.Client, tag: str) -> dict[str, dict]:
    """Chat, streamed chat, completion, embeddings, requests refused with 429 and a stream the
    client abandons; returns what each client was told, by client_request_id."""
    told: dict[str, dict] = {}

    def post(path: str, name: str, body: dict) -> httpx.Response:
        crid = f"{tag}-{name}"
        r = http.post(path, json={**body, "client_request_id": crid})
        usage = r.json().get("usage") if r.status_code == 200 else None
        told[crid] = {"status": r.status_code,
                      "input": (usage or {}).get("prompt_tokens", 0),
                      "output": (usage or {}).get("completion_tokens", 0)}
        return r

    post("/v1/chat/completions", "chat", {"model": "tiny-chat", "max_tokens": 5,
                                          "messages": [{"role": "user", "content": "hello"}]})
    post("/v1/completions", "completion", {"model": "tiny-completions", "prompt": "once upon",
                                           "max_tokens": 4})
    for i in range(2):
        post("/v1/embeddings", f"embed-{i}", {"model": "all-minilm-l6-v2",
                                              "input": ["a cat", "a dog on a mat"]})
    for i in range(3):  # the endpoint allows two requests a minute in all
        post("/serving-endpoints/u-limited/invocations", f"limited-{i}", {"input": "x"})

    crid = f"{tag}-stream"
    usage = None
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "tiny-chat", "max_tokens": 6, "stream": True, "client_request_id": crid,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "stream"}]}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    told[crid] = {"status": 200, "input": usage["prompt_tokens"],
                  "output": usage["completion_tokens"]}

    crid = f"{tag}-cancelled"
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "tiny-chat", "max_tokens": LONG_GENERATION, "ignore_eos": True, "stream": True,
            "client_request_id": crid,
            "messages": [{"role": "user", "content": "a long one"}]}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content"' in line and '"content":""' not in line.replace(" ", ""):
                break  # the client goes away after the first token
    told[crid] = {"status": 499}
    return told


def check_mixed(http: httpx.Client, url: str) -> None:
    tag = f"mixed-{uuid.uuid4().hex[:8]}"
    told = mixed_requests(http, tag)
    statuses = sorted(t["status"] for k, t in told.items() if "limited" in k)
    assert statuses == [200, 200, 429], told
    wait_rows(url, tag, len(told))
    # Exactly one row per request: a stray or duplicated record would have arrived by now (the
    # writer drains every block_ms, 0.5 s).
    time.sleep(1.5)
    got = rows(url, "client_request_id LIKE :t", t=f"{tag}%")
    assert len(got) == len(told), sorted(r["client_request_id"] for r in got)
    found = {r["client_request_id"]: r for r in got}
    assert set(found) == set(told), (set(told) ^ set(found))
    for crid, t in told.items():
        row = found[crid]
        assert row["status_code"] == t["status"], (crid, row)
        if t["status"] == 200:
            assert (row["input_token_count"], row["output_token_count"]) == (t["input"], t["output"]), (crid, row)
        if t["status"] == 429:
            assert row["input_token_count"] == row["output_token_count"] == 0
    stream, cancelled = found[f"{tag}-stream"], found[f"{tag}-cancelled"]
    assert bool(stream["request_streaming"]) and stream["time_to_first_token_ms"] is not None
    # What the engine generated before it was stopped: more than nothing, less than asked.
    assert 0 < cancelled["output_token_count"] < LONG_GENERATION
    embed = found[f"{tag}-embed-0"]
    assert embed["input_character_count"] == len("a cat") + len("a dog on a mat")
    assert embed["endpoint_name"] == "all-minilm-l6-v2" and embed["requester"]


def records(system, endpoint: str) -> list[dict[str, str]]:
    """An endpoint's usage records as the quota service wrote them to its stream (string
    fields), read from where they end up: the SQL table the usage writer keeps (the writer
    deletes them from Redis once written)."""
    out = []
    where = "endpoint_name = :e ORDER BY request_time"
    for r in rows(system.usage_database_url, where, e=endpoint):
        out.append({
            "request_id": r["request_id"], "client_request_id": r["client_request_id"],
            "status_code": str(r["status_code"]), "principal": r["requester"],
            "input_tokens": str(r["input_token_count"]),
            "output_tokens": str(r["output_token_count"]),
            "streaming": "1" if r["request_streaming"] else "0",
            "expired": "1" if r["settled_by_lease"] else "0",
        })
    return out
