"""Usage records and inference tables on the session's system (SQLite, as `make run` keeps
them): one row per request with the tokens the client was told, a writer killed mid-drain that
loses and duplicates nothing, sampled payloads, no secrets, and the usage API."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import httpx
import pytest
import sqlalchemy as sa

from helpers.usage import check_mixed, rows, wait_rows


@pytest.fixture(scope="module")
def db(system) -> str:
    return system.usage_database_url


def test_every_request_leaves_one_row_with_what_its_client_was_told(http, db):
    check_mixed(http, db)


def test_a_writer_killed_mid_drain_loses_and_duplicates_nothing(system, db):
    """A backlog builds in Redis while the writer is stopped (SIGSTOP); it resumes under more
    load, and is killed (SIGKILL) mid-drain: holding records it read and never acknowledged,
    after it had written and acknowledged others. Restarted under the same consumer name, it
    finishes them. Every request is one row, none missing, none twice."""
    import redis

    from fmapi_usage.config import UsageConfig

    fields = UsageConfig.model_fields
    stream = f"{fields['key_prefix'].default}:{{all-minilm-l6-v2}}:usage"
    group = fields["consumer_group"].default
    victim = system.child("usage")
    consumer = b"usage"  # its name in the group: System sets FMAPI_USAGE_CONSUMER to the replica's
    # With FMAPI_TEST_REPLICAS=usage=N the other writers would drain the backlog: stopped too.
    others = [c for c in system.sup.children if c.name.startswith("usage-") and c.alive()]
    r = redis.Redis.from_url(system.redis_url)

    def state() -> tuple[int, int]:
        """(records acknowledged and deleted from the stream so far, records the victim read
        and has not acknowledged)."""
        info = r.xinfo_stream(stream)
        mine = [c["pending"] for c in r.xpending(stream, group)["consumers"]
                if c["name"] == consumer]
        return info["entries-added"] - info["length"], sum(mine)

    tag = f"kill-{uuid.uuid4().hex[:8]}"
    statuses: list[int] = []
    lock = threading.Lock()
    sent = 0

    def load(n: int, threads: int = 4) -> threading.Thread:
        """``n`` more requests, ``threads`` at a time, in the background."""
        nonlocal sent
        ids = iter(range(sent, sent + n))
        sent += n

        def worker():
            with httpx.Client(base_url=system.base_url, timeout=60,
                              headers={"authorization": f"Bearer {system.admin_token}"}) as c:
                while True:
                    with lock:
                        i = next(ids, None)
                    if i is None:
                        return
                    code = c.post("/v1/embeddings", json={
                        "model": "all-minilm-l6-v2", "input": f"sentence {i}",
                        "client_request_id": f"{tag}-{i}"}).status_code
                    with lock:
                        statuses.append(code)

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        done = threading.Thread(target=lambda: [t.join(120) for t in pool])
        done.start()
        return done

    # The writer has the endpoint's stream and its group (made when it first sees the endpoint).
    warm = f"warm-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=system.base_url, timeout=60,
                      headers={"authorization": f"Bearer {system.admin_token}"}) as c:
        assert c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "warm",
                                              "client_request_id": warm}).status_code == 200
    assert wait_rows(db, warm, 1)

    for c in (victim, *others):
        os.kill(c.proc.pid, signal.SIGSTOP)
    loads: list[threading.Thread] = []
    try:
        loads.append(load(60))
        loads[-1].join(120)
        # The backlog, waiting (each record lands with its settlement, just after its response).
        backlog_by = time.monotonic() + 10
        while r.xlen(stream) < 60:
            assert time.monotonic() < backlog_by, r.xlen(stream)
            time.sleep(0.05)
        acked_at_start, _ = state()
        # The writer runs in slices of a few milliseconds, more load arriving meanwhile, and is
        # looked at only while stopped (a sample no acknowledgement can race), until it holds
        # unacknowledged records after having acknowledged some of the backlog.
        loads.append(load(60))
        deadline = time.monotonic() + 60
        while True:
            os.kill(victim.proc.pid, signal.SIGCONT)
            time.sleep(0.003)
            os.kill(victim.proc.pid, signal.SIGSTOP)
            acked, at_kill = state()
            if at_kill and acked > acked_at_start:
                break
            if not loads[-1].is_alive() and not r.xlen(stream):
                loads.append(load(30))  # drained between two looks: more
            assert time.monotonic() < deadline, "the writer was never seen mid-drain"
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        acked_at_kill = acked - acked_at_start
        assert state()[1] == at_kill  # read, never acknowledged: they wait for their consumer
    finally:
        for c in (victim, *others):
            if c.alive():
                os.kill(c.proc.pid, signal.SIGCONT)
    written_before = len(rows(db, "client_request_id LIKE :t", t=f"{tag}%"))
    for t in loads:
        t.join(120)
    assert statuses == [200] * sent  # metering never depends on the writer

    log_from = victim.log_path.stat().st_size
    t0 = time.monotonic()
    system.restart("usage")
    wait_rows(db, tag, sent, timeout=60)
    took = time.monotonic() - t0
    if not others:  # alone, it finishes its own records first thing, not after the claim timeout
        log = victim.log_path.read_bytes()[log_from:].decode(errors="replace")
        assert "this writer (usage) read before" in log, log[-3000:]
    time.sleep(1.0)  # anything twice would have arrived by now
    ids = [row["client_request_id"] for row in rows(db, "client_request_id LIKE :t",
                                                     t=f"{tag}%")]
    assert len(ids) == sent and set(ids) == {f"{tag}-{i}" for i in range(sent)}, (
        len(ids), sent, f"{at_kill} pending at the kill after {acked_at_kill} acknowledged, "
        f"{written_before} rows written by then, {took:.1f} s after the restart")
    assert state()[1] == 0 and r.xlen(stream) == 0
    r.close()


def _table(db: str, name: str) -> list[dict]:
    engine = sa.create_engine(db)
    try:
        with engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.text(f'SELECT * FROM "{name}"'))]
    finally:
        engine.dispose()


def _wait_table(db: str, name: str, n: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = _table(db, name)
        except sa.exc.OperationalError:  # not created yet
            found = []
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_an_inference_table_keeps_its_sample_of_requests(http, db):
    n = 400
    for i in range(n):
        r = http.post("/serving-endpoints/u-logged/invocations", json={"input": f"logged {i}"})
        assert r.status_code == 200
    deadline = time.monotonic() + 30
    while len(rows(db, "endpoint_name = 'u-logged'")) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    kept = _table(db, "u_logged_payload")
    # Binomial(400, 0.5): mean 200, standard deviation 10; 4.5 of them either way.
    assert 155 <= len(kept) <= 245, len(kept)
    row = kept[0]
    body = json.loads(row["request"])
    assert body["input"].startswith("logged ") and row["sampling_fraction"] == 0.5
    assert len(json.loads(row["response"])["data"][0]["embedding"]) == 384


def test_a_streamed_response_is_stored_whole(http, db):
    crid = f"logged-stream-{uuid.uuid4().hex[:8]}"
    text = ""
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "u-logged-chat", "stream": True, "max_tokens": 12, "client_request_id": crid,
            "messages": [{"role": "user", "content": "tell me"}]}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    text += ch["delta"].get("content") or ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kept = [r for r in _wait_table(db, "chat_log_payload", 1) if r["client_request_id"] == crid]
        if kept:
            break
        time.sleep(0.2)
    (row,) = kept
    response = json.loads(row["response"])
    assert response["choices"][0]["message"]["content"] == text and text
    assert json.loads(row["request"])["messages"][0]["content"] == "tell me"


def test_no_token_secret_in_any_table(system, http, db):
    made = http.post("/api/2.0/token/create", json={"comment": "secret check"}).json()
    secret = made["token_value"]
    with httpx.Client(base_url=system.base_url, timeout=60,
                      headers={"authorization": f"Bearer {secret}"}) as c:
        for name in ("u-logged", "u-logged-chat"):
            body = ({"input": "s"} if name == "u-logged"
                    else {"messages": [{"role": "user", "content": "s"}]})
            for _ in range(4):
                assert c.post(f"/serving-endpoints/{name}/invocations", json=body).status_code == 200
    time.sleep(2)
    engine = sa.create_engine(db)
    try:
        with engine.connect() as c:
            tables = sa.inspect(engine).get_table_names()
            assert {"endpoint_usage", "served_entities", "u_logged_payload"} <= set(tables)
            for table in tables:
                for row in c.execute(sa.text(f'SELECT * FROM "{table}"')):
                    text = " ".join(str(v) for v in row)
                    for s in (secret, system.admin_token):
                        assert s not in text, table
                        assert s[-12:] not in text, table
    finally:
        engine.dispose()


def test_served_entities_follow_the_registry(db):
    engine = sa.create_engine(db)
    try:
        with engine.connect() as c:
            got = {(r.endpoint_name, r.model) for r in c.execute(
                sa.text("SELECT endpoint_name, model FROM served_entities"))}
    finally:
        engine.dispose()
    assert ("tiny-chat", "tiny") in got and ("all-minilm-l6-v2", "all-minilm-l6-v2") in got


def test_usage_api_shows_callers_their_own_and_admins_everything(system, http, db):
    made = http.post("/api/2.0/token/create", json={
        "comment": "usage reader", "principal": "usage-alice",
        "endpoints": ["all-minilm-l6-v2"]}).json()
    with httpx.Client(base_url=system.base_url, timeout=60,
                      headers={"authorization": f"Bearer {made['token_value']}"}) as alice:
        for _ in range(3):
            assert alice.post("/v1/embeddings", json={"model": "all-minilm-l6-v2",
                                                      "input": "mine"}).status_code == 200
        deadline = time.monotonic() + 20
        while len(rows(db, "requester = 'usage-alice'")) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        mine = alice.get("/api/2.0/usage", params={"since": "1h", "by": "principal,endpoint"}).json()
        assert mine["principal"] == "usage-alice"
        assert [(g["principal"], g["endpoint"], g["requests"]) for g in mine["groups"]] == [
            ("usage-alice", "all-minilm-l6-v2", 3)]
        assert alice.get("/api/2.0/serving-endpoints/u-logged/inference-table").status_code == 403

    everyone = http.get("/api/2.0/usage", params={"since": "1h", "by": "endpoint,principal,day"})
    assert everyone.status_code == 200, everyone.text
    groups = everyone.json()["groups"]
    raw = rows(db)
    assert sum(g["requests"] for g in groups) == len(raw)
    assert sum(g["input_tokens"] for g in groups) == sum(r["input_token_count"] for r in raw)
    assert sum(g["output_tokens"] for g in groups) == sum(r["output_token_count"] for r in raw)
    assert len({g["principal"] for g in groups}) >= 2
    # An empty window sums to nothing; a bad grouping is a 400 naming it.
    assert http.get("/api/2.0/usage", params={"since": "2000-01-01", "until": "2000-01-02",
                                              "by": "endpoint"}).json()["groups"] == []
    r = http.get("/api/2.0/usage", params={"by": "colour"})
    assert r.status_code == 400 and "colour" in r.json()["message"]


def test_payloads_and_usage_through_the_cli(system, capsys):
    from fmapi_cli.main import main

    common = ["--url", system.base_url, "--token", system.admin_token]
    assert main(["usage", "--since", "1h", "--by", "endpoint", "--format", "csv", *common]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("endpoint,requests,input_tokens")
    assert any(line.startswith("all-minilm-l6-v2,") for line in out[1:])
    assert main(["endpoints", "payloads", "u-logged", "--limit", "3", "--json", *common]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 3
