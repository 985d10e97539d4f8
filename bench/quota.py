"""What metering costs.

1. Through Envoy: the latency a small embedding request gets with admission and settlement
   (metered, as `make run` serves it) and without (the same system with the gateway's
   ``unmetered`` benchmark switch), in one run, alternating blocks of sequential requests.
   Goal: <= 1 ms added at p50.
2. Admissions + settlements per second of one quota replica (gRPC, mutual TLS, as deployed):
   one Redis (append-only file fsynced on every write, as `fmapi dev up` runs it, and, for
   comparison, without persistence) and one quota replica; 1 then CLIENTS concurrent clients,
   each as the gateway would: Admit (endpoint and per-principal limits, input + output), then
   Settle.

Run: ``make bench quota`` (or ``python -m bench quota``).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path

from .common import median, pct, table

CLIENTS = 8
SECONDS = 4.0
WARMUP_SECONDS = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(sup, tmp: Path, persistence: list[str]) -> str:
    port = _free_port()
    sup.start(f"redis-{port}", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--dir", str(tmp), *persistence])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


async def _load(addr: str, tls_files, clients: int) -> tuple[int, list[float], list[float], float]:
    from fmapi.quota.v1 import quota_pb2 as pb
    from fmapi.quota.v1 import quota_pb2_grpc
    from fmapi_common.channels import make_channel

    rules = [pb.LimitRule(key=pb.LIMIT_KEY_ENDPOINT, requests_per_minute=10**9,
                          input_tokens_per_minute=10**12, output_tokens_per_minute=10**12),
             pb.LimitRule(key=pb.LIMIT_KEY_PRINCIPAL, requests_per_minute=10**9,
                          input_tokens_per_minute=10**12, output_tokens_per_minute=10**12)]
    admit_ms: list[float] = []
    settle_ms: list[float] = []
    cycles = 0
    measuring = False
    async with make_channel(addr, tls_files, "quota") as ch:
        stub = quota_pb2_grpc.QuotaServiceStub(ch)

        async def client(k: int, until: float) -> None:
            nonlocal cycles
            i = 0
            while time.monotonic() < until:
                i += 1
                rid = f"bench-{k}-{i}-{time.monotonic_ns()}"
                t0 = time.perf_counter()
                await stub.Admit(pb.AdmitRequest(
                    request_id=rid, endpoint="bench", served_model="m",
                    capacity_mode=pb.CAPACITY_MODE_PAY_PER_TOKEN,
                    caller=pb.Caller(principal=f"user{k}", principal_kind=pb.PRINCIPAL_KIND_USER),
                    input_tokens=20, reserved_output_tokens=64, rules=rules), timeout=5)
                t1 = time.perf_counter()
                await stub.Settle(pb.SettleRequest(request_id=rid, endpoint="bench",
                                                   output_tokens=16, status_code=200), timeout=5)
                t2 = time.perf_counter()
                if measuring:
                    admit_ms.append((t1 - t0) * 1000)
                    settle_ms.append((t2 - t1) * 1000)
                    cycles += 1

        warm_until = time.monotonic() + WARMUP_SECONDS
        await asyncio.gather(*(client(k, warm_until) for k in range(clients)))
        measuring = True
        t0 = time.monotonic()
        await asyncio.gather(*(client(k, t0 + SECONDS) for k in range(clients)))
        elapsed = time.monotonic() - t0
    return cycles, admit_ms, settle_ms, elapsed


def _report(title: str, rate: float, admit: list[float], settle: list[float]) -> None:
    table(f"quota ({title}), one replica, {SECONDS:g} s", [
        ("admit+settle per second", f"{rate:8.0f}   ({2 * rate:.0f} calls/s)"),
        ("Admit  p50 / p99", f"{pct(admit, 50):6.2f} / {pct(admit, 99):6.2f} ms"),
        ("Settle p50 / p99", f"{pct(settle, 50):6.2f} / {pct(settle, 99):6.2f} ms"),
    ])


N = 2000  # sequential requests per side through Envoy
BLOCK = 100
ENDPOINTS = """
endpoints:
  - name: all-minilm-l6-v2
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits:
      requests_per_minute: 1000000000
      input_tokens_per_minute: 1000000000000
      endpoint: {requests_per_minute: 1000000000, input_tokens_per_minute: 1000000000000}
"""


def _queue_wait(system) -> tuple[float, float]:
    """The embedding server's queue-wait histogram so far: (seconds waited in all, requests)."""
    name = "fmapi_embedding_queue_wait_seconds"
    return system.metric("embedding", f"{name}_sum"), system.metric("embedding", f"{name}_count")


def through_envoy() -> dict[str, float]:
    """Also says where the added time goes: the embedding server starts a lone request as soon
    as it is admitted (unmetered: at once), so the difference in its queue wait is the
    admission (a gRPC call to the quota service, its Redis script and fsync); anything else is
    spent around it (the gateway's metering, the settlement's CPU beside the next request)."""
    import httpx

    from fmapi_cli.system import System, SystemOptions

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "endpoints.yaml").write_text(ENDPOINTS)
        systems = {
            name: System(SystemOptions(runtime_dir=tmp / name, http_port=0, metered=metered,
                                       endpoints_file=tmp / "endpoints.yaml"))
            for name, metered in (("metered", True), ("unmetered", False))
        }
        lat: dict[str, list[float]] = {name: [] for name in systems}
        blocks: dict[str, list[float]] = {name: [] for name in systems}  # p50 of each block
        # (seconds waited, requests) at the embedding server, over the measured blocks
        waited: dict[str, tuple[float, float]] = {name: (0.0, 0.0) for name in systems}
        clients: dict[str, httpx.Client] = {}
        try:
            for s in systems.values():
                s.start()
            for name, s in systems.items():
                clients[name] = httpx.Client(base_url=s.base_url, timeout=30,
                                             headers={"authorization": f"Bearer {s.admin_token}"})
            body = {"model": "all-minilm-l6-v2", "input": "a small sentence to embed"}

            def block(name: str, n: int, out: list[float] | None) -> None:
                before = _queue_wait(systems[name])
                got = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    r = clients[name].post("/v1/embeddings", json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"{name}: {r.status_code} {r.text[:200]}")
                    got.append((time.perf_counter() - t0) * 1000)
                if out is not None:
                    out.extend(got)
                    blocks[name].append(pct(got, 50))
                    after = _queue_wait(systems[name])
                    waited[name] = tuple(w + a - b for w, a, b in zip(waited[name], after, before))

            for name in systems:
                block(name, 100, None)  # warm-up
            names = list(systems)
            for i in range(N // BLOCK):
                for name in names if i % 2 == 0 else names[::-1]:
                    block(name, BLOCK, lat[name])
        finally:
            for c in clients.values():
                c.close()
            for s in systems.values():
                s.stop()
    m, u = lat["metered"], lat["unmetered"]
    # Block i of one side ran right beside block i of the other: their difference is taken
    # under the same machine noise, and the median of those differences ignores a slow spell.
    paired = sorted(a - b for a, b in zip(blocks["metered"], blocks["unmetered"]))
    wait = {name: total / n * 1000 if n else float("nan") for name, (total, n) in waited.items()}
    admission = wait["metered"] - wait["unmetered"]
    table(f"quota through Envoy: POST /v1/embeddings, {N} sequential requests per side "
          f"(alternating blocks of {BLOCK})", [
        ("metered   p50 / p99", f"{pct(m, 50):6.2f} / {pct(m, 99):6.2f} ms"),
        ("unmetered p50 / p99", f"{pct(u, 50):6.2f} / {pct(u, 99):6.2f} ms"),
        ("added at p50", f"{pct(m, 50) - pct(u, 50):6.2f} ms   (goal <= 1 ms)"),
        ("added at p50, median of block pairs",
         f"{median(paired):6.2f} ms   (pairs from {paired[0]:.2f} to {paired[-1]:.2f})"),
        ("added at p99", f"{pct(m, 99) - pct(u, 99):6.2f} ms"),
        ("ratio p50 metered / unmetered", f"{pct(m, 50) / pct(u, 50):6.2f}"),
        ("queue wait at the embedding server, mean",
         f"metered {wait['metered']:.2f} ms, unmetered {wait['unmetered']:.2f} ms"),
        ("  of the added p50: the admission (the queue waits for it)", f"{admission:6.2f} ms"),
        ("  of the added p50: everything else", f"{median(paired) - admission:6.2f} ms   "
         "(gateway metering, settlement beside the next request)"),
    ])
    return {"p50_metered": pct(m, 50), "p50_unmetered": pct(u, 50),
            "added_p50_paired": median(paired),
            "queue_wait_metered_ms": wait["metered"],
            "queue_wait_unmetered_ms": wait["unmetered"]}


def run() -> dict[str, float]:
    return {**through_envoy(), **replica_throughput()}


def replica_throughput() -> dict[str, float]:
    from fmapi_cli.supervisor import Supervisor
    from fmapi_common import pki
    from fmapi_common.tls import TlsFiles

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pki.ensure_pki(tmp / "pki")
        p = pki.paths(tmp / "pki", "quota")
        g = pki.paths(tmp / "pki", "gateway")
        gateway_tls = TlsFiles(str(g.ca), str(g.cert), str(g.key))
        for name, persistence in (
            ("aof-always", ["--appendonly", "yes", "--appendfsync", "always"]),
            ("no-persistence", ["--appendonly", "no"]),
        ):
            sup = Supervisor(tmp / name / "logs")
            (tmp / name).mkdir(exist_ok=True)
            try:
                url = _start_redis(sup, tmp / name, persistence)
                child = sup.start("quota", [sys.executable, "-m", "fmapi_quota"], {
                    "FMAPI_QUOTA_REDIS_URL": url,
                    "FMAPI_QUOTA_PORT_FILE": str(tmp / name / "port"),
                    "FMAPI_QUOTA_TLS_CA_FILE": str(p.ca), "FMAPI_QUOTA_TLS_CERT_FILE": str(p.cert),
                    "FMAPI_QUOTA_TLS_KEY_FILE": str(p.key),
                })
                port = sup.wait_for_file(child, tmp / name / "port", 30)
                for clients in (1, CLIENTS):
                    cycles, admit, settle, elapsed = asyncio.run(
                        _load(f"127.0.0.1:{port}", gateway_tls, clients))
                    rate = cycles / elapsed
                    results[f"{name}_c{clients}"] = rate
                    _report(f"{name}, {clients} concurrent gateway client(s)", rate, admit, settle)
            finally:
                sup.stop()
    return {f"cycles_per_second_{k}": v for k, v in results.items()}


if __name__ == "__main__":
    run()
