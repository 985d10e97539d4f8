"""What durable usage costs.

1. Rows per second one usage writer sustains from Redis streams into SQLite (a file, as `make
   run` keeps it) and into PostgreSQL (a throwaway cluster), rounds alternating, after a
   warm-up: records as the quota service writes them, drained in batches of 500.
2. The latency an inference table adds to a request, through Envoy: the same small embedding
   request to an endpoint that keeps every request in its inference table and to one that keeps
   none, on one system, in alternating blocks of sequential requests. Goal: none (the payload
   travels with the settlement, after the answer).

Run: ``make bench usage`` (or ``python -m bench usage``).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from .common import pct, table

RECORDS = 20_000
ROUNDS = 4


def _record(i: int) -> dict[str, str]:
    return {"request_id": f"bench-{i}-{time.monotonic_ns()}", "client_request_id": "",
            "usage_context": "{}", "endpoint": f"e{i % 4}", "served_model": "m",
            "principal": f"user{i % 50}", "principal_kind": "user", "token_id": "t",
            "workspace": "default", "streaming": "0", "input_characters": "40",
            "input_tokens": "12", "output_tokens": "30", "status_code": "200",
            "start_ms": str(int(time.time() * 1000)), "duration_ms": "25", "ttft_ms": "5",
            "finish_reason": "stop", "expired": "0", "output_characters": "120"}


async def _writer_rate(redis_url: str, db_url: str) -> float:
    import redis.asyncio as aioredis

    from fmapi_usage.db import UsageDB
    from fmapi_usage.writer import UsageWriter

    client = aioredis.Redis.from_url(redis_url)
    db = UsageDB(db_url)
    db.migrate()
    try:
        async with client.pipeline(transaction=False) as p:
            for e in range(4):
                p.sadd("fmapi:quota:endpoints", f"e{e}")
            for i in range(RECORDS):
                p.xadd(f"fmapi:quota:{{e{i % 4}}}:usage", _record(i))
            await p.execute()
        writer = UsageWriter(client, db, consumer="bench", batch_size=500, block_ms=10)
        t0 = time.perf_counter()
        while writer.written < RECORDS:
            await writer.drain_once()
        return RECORDS / (time.perf_counter() - t0)
    finally:
        await client.aclose()
        db.close()


def writer_throughput() -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers.postgres import PostgresServer
    from helpers.redis_server import RedisServer

    rates: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        redis = RedisServer(tmp / "redis").start()
        pg = PostgresServer(tmp / "pg").start()
        try:
            for r in range(ROUNDS + 1):  # round 0 warms up
                for name in (("sqlite", "postgresql") if r % 2 else ("postgresql", "sqlite")):
                    url = f"sqlite:///{tmp / f'usage-{r}.db'}" if name == "sqlite" else pg.url
                    rate = asyncio.run(_writer_rate(redis.url, url))
                    if r:
                        rates[name].append(rate)
        finally:
            pg.stop()
            redis.stop()
    table(f"usage writer: {RECORDS} records per round, batches of 500, {ROUNDS} rounds", [
        (f"{name} rows/s (mean; min .. max)",
         f"{sum(v) / len(v):8.0f}   ({min(v):.0f} .. {max(v):.0f})") for name, v in rates.items()
    ])
    return {f"{k}_rows_per_s": sum(v) / len(v) for k, v in rates.items()}


N = 1000
BLOCK = 100
ENDPOINTS = """
endpoints:
  - name: kept
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    ai_gateway: {inference_table: {enabled: true}}
  - name: not-kept
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
"""


def inference_table_latency() -> dict[str, float]:
    import httpx

    from fmapi_cli.system import System, SystemOptions

    lat: dict[str, list[float]] = {"kept": [], "not-kept": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "endpoints.yaml").write_text(ENDPOINTS)
        s = System(SystemOptions(runtime_dir=tmp / "sys", http_port=0,
                                 endpoints_file=tmp / "endpoints.yaml"))
        try:
            s.start()
            with httpx.Client(base_url=s.base_url, timeout=30,
                              headers={"authorization": f"Bearer {s.admin_token}"}) as c:
                body = {"input": "a small sentence to embed"}

                def block(name: str, n: int, out: list[float] | None) -> None:
                    for _ in range(n):
                        t0 = time.perf_counter()
                        r = c.post(f"/serving-endpoints/{name}/invocations", json=body)
                        if r.status_code != 200:
                            raise RuntimeError(f"{name}: {r.status_code} {r.text[:200]}")
                        if out is not None:
                            out.append((time.perf_counter() - t0) * 1000)

                for name in lat:
                    block(name, 100, None)  # warm-up
                for i in range(N // BLOCK):
                    for name in (list(lat) if i % 2 == 0 else list(lat)[::-1]):
                        block(name, BLOCK, lat[name])
        finally:
            s.stop()
    on, off = lat["kept"], lat["not-kept"]
    table(f"inference table through Envoy: {N} sequential embedding requests per side "
          f"(alternating blocks of {BLOCK})", [
        ("kept     p50 / p99", f"{pct(on, 50):6.2f} / {pct(on, 99):6.2f} ms"),
        ("not kept p50 / p99", f"{pct(off, 50):6.2f} / {pct(off, 99):6.2f} ms"),
        ("added at p50", f"{pct(on, 50) - pct(off, 50):6.2f} ms   (goal: none)"),
        ("ratio p50 kept / not kept", f"{pct(on, 50) / pct(off, 50):6.2f}"),
    ])
    return {"p50_kept": pct(on, 50), "p50_not_kept": pct(off, 50)}


def run() -> dict[str, float]:
    return {**writer_throughput(), **inference_table_latency()}
