"""Where fmapi's time to first token goes, one streamed chat at a time (the tiny model, whose
engine costs almost nothing, so the differences are the path's).

Four ways to the same engine flags, in interleaved blocks (the order rotating each block):

* ``vLLM``: vLLM's own OpenAI server (``make bench generation``'s vLLM side);
* ``fmapi``: the system as `make run` serves it (Envoy with ext_authz, metering);
* ``no ext_authz``: a second Envoy on that same system without the ext_authz filter (the client
  sends the identity auth would have signed, as ``make bench auth`` does);
* ``unmetered``: a second system with the gateway's ``unmetered`` benchmark switch (no admission,
  no settlement).

TTFT = the first SSE line with content text - the request sent (httpx, sequential, one
keep-alive connection per side). Prints each side's TTFT p50 / p90 and, as medians of the
differences of adjacent blocks' p50s: what fmapi adds over vLLM, and of that what ext_authz and
metering (the admission the model server waits for and, under load, the CPU the settlements
and usage records take) add; the rest is the path itself (Envoy, the gateway, one more gRPC hop). Goal (issue 15): fmapi's TTFT p50 <= vLLM's + 5 ms.

``FMAPI_BENCH_TTFT_CONCURRENCY`` (default 1): streams in flight per side (closed loop: each of
that many threads sends its next request when its last one ends), to split where TTFT goes
under load the same way.

Run: ``make bench ttft`` (or ``python -m bench ttft``); not part of a plain ``make bench``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import chat_stream_body, median, pct, signed_identity, table
from .generation import FMAPI_ENGINE_ENV, ROOT, _start_vllm, _wait_http

BLOCKS = 12
BLOCK = 20  # sequential requests per side and thread per block
WARMUP = 20
OUTPUT_TOKENS = 16
CONCURRENCY = int(os.environ.get("FMAPI_BENCH_TTFT_CONCURRENCY", "1"))
PATH = "/v1/chat/completions"


def _ttft(client, body: dict, headers: dict[str, str]) -> float:
    """Milliseconds from sending the request to the first line whose delta has text."""
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", PATH, json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"content":"' in line \
                    and '"content":""' not in line:
                first = time.perf_counter()
    if first is None:
        raise RuntimeError("a stream ended without a token")
    return (first - t0) * 1000


def run() -> dict[str, float]:
    import httpx

    from fmapi_cli.supervisor import Supervisor
    from fmapi_cli.system import GenerationSpec, System, SystemOptions

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.redis_server import free_port
    from helpers.tiny_llm import build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_llama(tmp / "tiny")
        (tmp / "endpoints.yaml").write_text(
            "endpoints:\n  - name: tiny\n    task: llm/v1/chat\n"
            "    served_entities: [{model: tiny}]\n")
        systems = {
            name: System(SystemOptions(
                runtime_dir=tmp / name, http_port=0, endpoints_file=tmp / "endpoints.yaml",
                generation=[GenerationSpec("tiny", model, dict(FMAPI_ENGINE_ENV))],
                ready_timeout=900, metered=metered))
            for name, metered in (("fmapi", True), ("unmetered", False))
        }
        sup = Supervisor(tmp / "logs", grace=15)
        pool = ThreadPoolExecutor(CONCURRENCY)
        clients: dict[str, tuple[httpx.Client, object]] = {}
        try:
            vllm_port = free_port()
            vllm = _start_vllm(sup, "tiny", model, vllm_port)
            for s in systems.values():
                s.start()
            _wait_http(f"http://127.0.0.1:{vllm_port}/health", vllm, 900, "vLLM")
            fmapi = systems["fmapi"]
            noauth_port = fmapi.start_envoy("envoy-noauth", ext_authz=False)
            signed = signed_identity(fmapi, "POST", PATH)

            def bearer(s):
                return lambda: {"authorization": f"Bearer {s.admin_token}"}

            for name, url, headers in (
                ("vLLM", f"http://127.0.0.1:{vllm_port}", dict),
                ("fmapi", fmapi.base_url, bearer(fmapi)),
                ("no ext_authz", f"http://127.0.0.1:{noauth_port}", signed),
                ("unmetered", systems["unmetered"].base_url, bearer(systems["unmetered"])),
            ):
                clients[name] = (httpx.Client(
                    base_url=url, timeout=60,
                    limits=httpx.Limits(max_connections=CONCURRENCY + 4)), headers)
            body = chat_stream_body("tiny", OUTPUT_TOKENS)
            lat: dict[str, list[float]] = {name: [] for name in clients}
            blocks: dict[str, list[float]] = {name: [] for name in clients}

            def load(client, headers, n: int) -> list[float]:
                """TTFTs of ``n`` requests per thread, CONCURRENCY threads at once."""
                def one_thread() -> list[float]:
                    return [_ttft(client, body, headers()) for _ in range(n)]
                return [x for f in [pool.submit(one_thread) for _ in range(CONCURRENCY)]
                        for x in f.result()]

            for client, headers in clients.values():
                load(client, headers, WARMUP)
            names = list(clients)
            for b in range(BLOCKS):
                for name in names[b % len(names):] + names[:b % len(names)]:
                    client, headers = clients[name]
                    got = load(client, headers, BLOCK)
                    lat[name] += got
                    blocks[name].append(pct(got, 50))
        finally:
            pool.shutdown(cancel_futures=True)
            for client, _ in clients.values():
                client.close()
            for s in systems.values():
                s.stop()
            sup.stop()

    def added(a: str, b: str) -> float:
        return median([x - y for x, y in zip(blocks[a], blocks[b])])

    over_vllm = added("fmapi", "vLLM")
    authz = added("fmapi", "no ext_authz")
    metering = added("fmapi", "unmetered")
    streams = "one stream at a time" if CONCURRENCY == 1 else f"{CONCURRENCY} streams at a time"
    table(f"TTFT, tiny model, {streams} ({OUTPUT_TOKENS} tokens), "
          f"{BLOCKS} rotating blocks of {BLOCK * CONCURRENCY} per side", [
        *((f"{name} TTFT p50 / p90", f"{pct(v, 50):6.2f} / {pct(v, 90):6.2f} ms")
          for name, v in lat.items()),
        ("fmapi over vLLM at p50", f"{over_vllm:6.2f} ms   (goal <= 5 ms)"),
        ("  of it: ext_authz", f"{authz:6.2f} ms"),
        ("  of it: metering (admission, settlement)", f"{metering:6.2f} ms"),
        ("  of it: the rest of the path", f"{over_vllm - authz - metering:6.2f} ms   "
         "(Envoy, gateway, one more gRPC hop)"),
        ("(differences: median over blocks of the p50 differences of adjacent blocks)", ""),
    ])
    return {"ttft_over_vllm_ms": over_vllm, "ext_authz_ms": authz, "metering_ms": metering}
