"""The usage writer against a real Redis and a SQLite file: records as the quota service writes
them become rows exactly once — with two writers splitting the streams, and when a writer that
read records dies before writing them (another claims them)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis

from fmapi_usage.db import UsageDB
from fmapi_usage.writer import UsageWriter, payload_row, usage_row
from helpers.redis_server import RedisServer

PREFIX = "fmapi:quota"


def record(i: int, endpoint: str = "e1", **extra) -> dict[str, str]:
    """A usage record's fields, as the quota service's settlement writes them."""
    return {"request_id": f"r{i}", "client_request_id": f"c{i}", "usage_context": '{"k": "v"}',
            "endpoint": endpoint, "served_model": "m", "principal": "alice",
            "principal_kind": "user", "token_id": "t1", "workspace": "w", "streaming": "1",
            "input_characters": "11", "input_tokens": "3", "output_tokens": "7",
            "status_code": "200", "start_ms": str(1_700_000_000_000 + i), "duration_ms": "12",
            "ttft_ms": "4", "finish_reason": "stop", "expired": "0", "output_characters": "20",
            **extra}


@pytest.fixture
async def env(tmp_path):
    server = RedisServer(tmp_path).start()
    client = aioredis.Redis.from_url(server.url)
    db = UsageDB(f"sqlite:///{tmp_path / 'usage.db'}")
    db.migrate()
    yield client, db
    await client.aclose()
    db.close()
    server.stop()


async def fill(client, n: int, endpoints=("e1", "e2")) -> None:
    for e in endpoints:
        await client.sadd(f"{PREFIX}:endpoints", e)
    for i in range(n):
        e = endpoints[i % len(endpoints)]
        await client.xadd(f"{PREFIX}:{{{e}}}:usage", record(i, e))


def test_a_record_becomes_a_row_with_every_field():
    row = usage_row(record(5))
    assert row["request_id"] == "r5" and row["requester"] == "alice"
    assert (row["input_token_count"], row["output_token_count"]) == (3, 7)
    assert (row["input_character_count"], row["output_character_count"]) == (11, 20)
    assert row["request_streaming"] is True and row["settled_by_lease"] is False
    assert row["request_time"].timestamp() == pytest.approx(1_700_000_000.005)
    assert payload_row(record(5)) is None
    refused = usage_row({**record(6), "status_code": "429", "ttft_ms": "0"})
    assert refused["status_code"] == 429 and refused["time_to_first_token_ms"] is None
    p = payload_row(record(7, payload_request='{"input": "x"}', payload_response="",
                           payload_errors="RESPONSE_PAYLOAD_TOO_LARGE", payload_sampling="0.5"))
    assert p["request"] == '{"input": "x"}' and p["response"] is None
    assert p["logging_error_codes"] == "RESPONSE_PAYLOAD_TOO_LARGE" and p["sampling_fraction"] == 0.5


async def _drain(writer: UsageWriter, until, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        await writer.drain_once()


async def test_two_writers_split_the_streams_and_write_each_record_once(env):
    client, db = env
    await fill(client, 300)
    a = UsageWriter(client, db, consumer="a", batch_size=40, block_ms=50)
    b = UsageWriter(client, db, consumer="b", batch_size=40, block_ms=50)
    await asyncio.gather(_drain(a, lambda: db.count_usage() >= 300),
                         _drain(b, lambda: db.count_usage() >= 300))
    assert db.count_usage() == 300
    assert a.written > 0 and b.written > 0 and a.written + b.written == 300
    assert await a.backlog() == 0  # acknowledged records leave Redis


async def test_records_a_dead_writer_read_are_claimed_and_written_once(env):
    client, db = env
    await fill(client, 50, endpoints=("e1",))
    dead = UsageWriter(client, db, consumer="dead", batch_size=20, block_ms=50)
    await dead._streams()
    taken = await dead._read(await dead._streams())  # read, then "killed": never written
    assert len(taken) == 20
    # It wrote part of a batch before dying: those rows exist, unacknowledged.
    await asyncio.to_thread(db.insert_usage, [usage_row(f) for _, _, f in taken[:5]])
    heir = UsageWriter(client, db, consumer="heir", batch_size=20, block_ms=50,
                       claim_idle_seconds=0.2)
    await asyncio.sleep(0.3)
    await _drain(heir, lambda: db.count_usage() >= 50)
    assert db.count_usage() == 50
    assert await heir.backlog() == 0
    pending = await client.xpending(f"{PREFIX}:{{e1}}:usage", "fmapi-usage-writer")
    assert pending["pending"] == 0


async def test_a_writer_restarted_under_its_name_first_finishes_what_it_had_read(env):
    client, db = env
    await fill(client, 50, endpoints=("e1", "e2"))
    # Killed mid-drain: it read a batch (10 of each stream), wrote part of it, acknowledged
    # nothing.
    dead = UsageWriter(client, db, consumer="usage-1", batch_size=10, block_ms=50)
    taken = await dead._read(await dead._streams())
    assert len(taken) == 20 and {k for k, _, _ in taken} == {f"{PREFIX}:{{e1}}:usage",
                                                             f"{PREFIX}:{{e2}}:usage"}
    await asyncio.to_thread(db.insert_usage, [usage_row(f) for _, _, f in taken[:8]])
    # One of those was also deleted from its stream: only its acknowledgement was lost.
    gone_key, gone_id, _ = taken[7]
    await client.xdel(gone_key, gone_id)

    # Restarted under the same name, with a claim timeout it never reaches here: its first
    # round is exactly the records it had read (not new ones, not after claim_idle_seconds).
    again = UsageWriter(client, db, consumer="usage-1", batch_size=10, block_ms=50,
                        claim_idle_seconds=600)
    assert await again.drain_once() == 19
    assert db.count_usage() == 20 and again.written == 12  # the duplicates absorbed
    for key in (f"{PREFIX}:{{e1}}:usage", f"{PREFIX}:{{e2}}:usage"):
        # Every one acknowledged, the deleted one too; none of the new ones read yet.
        assert (await client.xpending(key, "fmapi-usage-writer"))["pending"] == 0, key
    assert await again.backlog() == 30
    # Then the new records, once its own are done.
    await _drain(again, lambda: db.count_usage() >= 50)
    assert db.count_usage() == 50 and again.written == 42
    assert await again.backlog() == 0


async def test_payload_records_fill_the_endpoint_s_inference_table(env):
    client, db = env
    await client.hset("fmapi:registry:endpoints", "e1", json.dumps(
        {"name": "e1", "ai_gateway": {"inference_table": {"enabled": True,
                                                         "table_name_prefix": "Team Log"}}}))
    await client.sadd(f"{PREFIX}:endpoints", "e1")
    await client.xadd(f"{PREFIX}:{{e1}}:usage", record(1, payload_request='{"a": 1}',
                                                       payload_response='{"b": 2}',
                                                       payload_errors="", payload_sampling="1.0"))
    await client.xadd(f"{PREFIX}:{{e1}}:usage", record(2))
    w = UsageWriter(client, db, consumer="w", block_ms=50)
    await _drain(w, lambda: db.count_usage() >= 2)
    rows = db.query_payloads("team_log_payload", since=usage_row(record(0))["request_time"], limit=10)
    assert [(r["request_id"], r["request"], r["response"]) for r in rows] == [
        ("r1", '{"a": 1}', '{"b": 2}')]


async def test_a_malformed_record_is_set_aside_and_the_rest_are_written(env):
    client, db = env
    await client.sadd(f"{PREFIX}:endpoints", "e1")
    await client.xadd(f"{PREFIX}:{{e1}}:usage", record(1))
    broken = record(2)
    del broken["request_id"]
    await client.xadd(f"{PREFIX}:{{e1}}:usage", broken)
    await client.xadd(f"{PREFIX}:{{e1}}:usage", record(3, start_ms="not a time"))
    await client.xadd(f"{PREFIX}:{{e1}}:usage", record(4))
    w = UsageWriter(client, db, consumer="w", block_ms=50)
    await _drain(w, lambda: db.count_usage() >= 2)
    await w.drain_once()
    assert db.count_usage() == 2
    dead = await client.xrange(f"{PREFIX}:usage-dead")
    assert len(dead) == 2 and all(b"_error" in f for _, f in dead)
    assert await w.backlog() == 0  # nothing left to retry forever


async def test_a_steady_trickle_is_written_in_batches_not_a_transaction_per_record(env):
    """Records arriving one every 10 ms: with the writer's linger, a few transactions write
    them all (each record once); without it, a transaction for every record or two."""
    client, db = env
    await client.sadd(f"{PREFIX}:endpoints", "e1")
    transactions = {"n": 0}
    insert = db.insert_usage

    def counted(rows):
        transactions["n"] += 1
        return insert(rows)

    db.insert_usage = counted
    w = UsageWriter(client, db, consumer="w", block_ms=50, linger_ms=250)
    task = asyncio.create_task(w.run())
    try:
        for i in range(60):
            await client.xadd(f"{PREFIX}:{{e1}}:usage", record(i))
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + 10
        while db.count_usage() < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
    assert db.count_usage() == 60
    assert transactions["n"] <= 8, transactions
