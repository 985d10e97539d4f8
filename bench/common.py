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


def chat_stream_body(model: str, max_tokens: int, content: str = "Tell me a story") -> dict:
    """A streamed chat completion of exactly ``max_tokens`` tokens (``ignore_eos``, temperature
    0) whose last chunk carries the usage."""
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


async def stream_tokens(client, body: dict) -> int:
    """Stream one chat completion through ``client`` (an httpx.AsyncClient): its output tokens,
    from its usage chunk."""
    import json

    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"usage":{' in line:
                tokens += json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens


async def stream_rate(base_url: str, headers: dict, model: str, n: int, clients: int,
                      max_tokens: int) -> float:
    """``n`` streamed chat completions (:func:`chat_stream_body`) through ``base_url`` from
    ``clients`` concurrent clients: output tokens per second."""
    import time

    t0 = time.perf_counter()
    tokens = await stream_total(base_url, headers, model, n, clients, max_tokens)
    return tokens / (time.perf_counter() - t0)


async def stream_total(base_url: str, headers: dict, model: str, n: int, clients: int,
                       max_tokens: int) -> int:
    """:func:`stream_rate`'s load: the output tokens of all ``n`` completions."""
    import asyncio

    import httpx

    body = chat_stream_body(model, max_tokens)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    tokens = 0
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120, limits=limits) as c:
        pending = list(range(n))

        async def worker():
            nonlocal tokens
            while pending:
                pending.pop()
                # Await first: ``tokens += await ...`` reads ``tokens`` before the await, so
                # concurrent workers would overwrite each other's counts.
                got = await stream_tokens(c, body)
                tokens += got

        await asyncio.gather(*(worker() for _ in range(clients)))
    return tokens


def spread(values: list[float]) -> float:
    """(max - min) / median: how far repeated measurements of one thing disagree."""
    if len(values) < 2:
        return float("nan")
    m = statistics.median(values)
    return (max(values) - min(values)) / m if m else float("nan")


def grid(title: str, header: list[str], rows: list[list[str]], notes: list[str] = ()) -> None:
    """A table with aligned columns (first column left-aligned, the rest right-aligned)."""
    print(f"\n== {title}")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(header))
    for r in rows:
        print(line(r))
    for n in notes:
        print(f"  {n}")


# ---------------------------------------------------------------- CPU time of processes

_CLK_TCK = None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one live process (all its threads, not its children), from
    /proc/<pid>/stat; 0 if it is gone."""
    global _CLK_TCK
    if _CLK_TCK is None:
        import os

        _CLK_TCK = os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


class CpuMeter:
    """CPU seconds of named processes (and of this one, as "client") added up over the spans
    measured between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.total = {name: 0.0 for name in (*pids, "client")}
        self._at: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {**{n: cpu_seconds(p) for n, p in self.pids.items()},
                "client": ru.ru_utime + ru.ru_stime}

    def start(self) -> None:
        self._at = self._now()

    def stop(self) -> None:
        for n, v in self._now().items():
            self.total[n] += v - self._at[n]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), from /proc."""
    import os

    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def signed_identity(system, method: str, path: str):
    """For a client of an Envoy without ext_authz (``system.start_envoy(..., ext_authz=False)``):
    a function giving the headers auth would have added, the admin identity signed with
    ``system``'s key and bound to ``method``, ``path`` and a fresh request id on each call, so
    that the gateway does the same work as behind ext_authz."""
    import itertools
    import time

    from fmapi_common import identity

    key = identity.parse_key(system.identity_key)
    ident = identity.Identity(principal="admin", workspace="default", token_id="bench",
                              scopes=("*",), admin=True)
    rids = itertools.count()

    def headers() -> dict[str, str]:
        rid = f"bench-{next(rids)}"
        binding = identity.Binding.of(method, path, rid)
        return {**identity.sign_identity(ident, key, time.time(), binding), "x-request-id": rid}

    return headers
