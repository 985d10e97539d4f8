"""Shared benchmark helpers: sentences, percentiles, the report table."""

from __future__ import annotations

import statistics

WORDS = (
    "model token vector river mountain engine cloud garden window signal market kernel planet "
    "lantern harbor violin crystal thunder meadow orbit canvas compass ember falcon glacier"
).split()


def sentences(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."
        for _ in range(n)
    ]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    vs = sorted(values)
    k = min(len(vs) - 1, max(0, round(p / 100 * (len(vs) - 1))))
    return vs[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")


async def embeddings_rate(base_url: str, headers: dict, n: int, clients: int) -> float:
    """``n`` one-sentence embeddings requests through ``base_url`` from ``clients`` concurrent
    clients: requests per second."""
    import asyncio
    import time

    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120, limits=limits) as c:
        pending = list(range(n))

        async def worker():
            while pending:
                i = pending.pop()
                r = await c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2",
                                                         "input": f"sentence number {i} to embed"})
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return n / (time.perf_counter() - t0)
