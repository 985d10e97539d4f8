"""Where the front processes spend their CPU: py-spy samples every fmapi process in the path
while a steady load runs, and prints, per process, its CPU seconds per request (or per 1000
output tokens) and the functions that take most of its samples, grouped by the library they
belong to.

Two loads, one after the other, on one system with the tiny model (its engine costs almost
nothing, so what is left is the path itself):

* ``stream``: CONCURRENCY clients streaming chat completions (OUTPUT_TOKENS tokens each,
  ``ignore_eos``) through Envoy;
* ``embed``: CONCURRENCY clients sending one-sentence embedding requests through Envoy.

Flame graphs (SVG) are written to ``.fmapi/bench/profiles/`` for a closer look.
Run: ``make bench profile`` (or ``python -m bench profile``); needs ``py-spy`` (``pip install
py-spy``: a profiling tool, not a dependency of fmapi).
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import chat_stream_body, cpu_seconds, sentences, stream_tokens

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".fmapi" / "bench" / "profiles"
CONCURRENCY = int(os.environ.get("FMAPI_BENCH_PROFILE_CONCURRENCY", "16"))
SECONDS = float(os.environ.get("FMAPI_BENCH_PROFILE_SECONDS", "20"))
OUTPUT_TOKENS = 64
PROCESSES = ("gateway", "auth", "quota", "generation-tiny", "embedding")
TOP = 12

# A sampled frame's library: the first of these its file path contains (else its file's name).
LIBRARIES = [
    ("fmapi_gateway", "fmapi gateway"), ("fmapi_generation", "fmapi generation"),
    ("fmapi_embedding", "fmapi embedding"), ("fmapi_auth", "fmapi auth"),
    ("fmapi_quota", "fmapi quota"), ("fmapi_common", "fmapi common"),
    ("/grpc/", "grpc"), ("starlette", "starlette"), ("uvicorn", "uvicorn"), ("h11", "h11"),
    ("httptools", "httptools"), ("opentelemetry", "opentelemetry"),
    ("prometheus_client", "prometheus"), ("google/protobuf", "protobuf"), ("redis", "redis"),
    ("vllm", "vllm"), ("transformers", "transformers"), ("tokenizers", "tokenizers"),
    ("sentence_transformers", "sentence-transformers"), ("torch", "torch"),
    ("asyncio", "asyncio"), ("pydantic", "pydantic"), ("orjson", "orjson"),
    ("numpy", "numpy"), ("ssl", "ssl"),
]


def _library(frame: str) -> str:
    for needle, name in LIBRARIES:
        if needle in frame:
            return name
    return frame.split(" (")[-1].rstrip(")").split(":")[0].rsplit("/", 1)[-1] or frame


def summarize(raw: Path) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """py-spy's raw (collapsed) stacks: total samples, the leaf functions with most samples
    (self time), and libraries by samples whose leaf is theirs."""
    functions: collections.Counter = collections.Counter()
    libraries: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack.split(";")[-1]
        functions[leaf] += n
        libraries[_library(leaf)] += n
    return total, functions.most_common(TOP), libraries.most_common(TOP)


async def _stream_load(base_url: str, token: str, until: float) -> tuple[int, int]:
    import httpx

    body = chat_stream_body("tiny-chat", OUTPUT_TOKENS, "hello there")
    requests = tokens = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=120,
                                 headers={"authorization": f"Bearer {token}"},
                                 limits=httpx.Limits(max_connections=CONCURRENCY)) as c:
        async def client() -> None:
            nonlocal requests, tokens
            while time.monotonic() < until:
                got = await stream_tokens(c, body)  # not ``tokens += await``: see stream_total
                tokens += got
                requests += 1

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return requests, tokens


async def _embed_load(base_url: str, token: str, until: float) -> tuple[int, int]:
    import httpx

    texts = sentences(512)
    requests = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=60,
                                 headers={"authorization": f"Bearer {token}"},
                                 limits=httpx.Limits(max_connections=CONCURRENCY)) as c:
        async def client(k: int) -> None:
            nonlocal requests
            i = k
            while time.monotonic() < until:
                r = await c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2",
                                                          "input": texts[i % len(texts)]})
                r.raise_for_status()
                requests += 1
                i += CONCURRENCY

        await asyncio.gather(*(client(k) for k in range(CONCURRENCY)))
    return requests, 0


def _profile(system, load: str) -> None:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    pids = {name: system.child(name).proc.pid for name in PROCESSES
            if any(c.name == name for c in system.sup.children)}
    OUT.mkdir(parents=True, exist_ok=True)
    fn = _stream_load if load == "stream" else _embed_load
    # Warm-up, then sample every process for SECONDS while the load runs.
    asyncio.run(fn(system.base_url, system.admin_token, time.monotonic() + 3))
    cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
    spies = {n: subprocess.Popen(
        [pyspy, "record", "--pid", str(p), "--duration", str(int(SECONDS)), "--rate", "100",
         "--nonblocking", "--format", "raw", "-o", str(OUT / f"{load}-{n}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for n, p in pids.items()}
    requests, tokens = asyncio.run(fn(system.base_url, system.admin_token,
                                      time.monotonic() + SECONDS))
    for spy in spies.values():
        spy.wait(60)
    cpu = {n: cpu_seconds(p) - cpu0[n] for n, p in pids.items()}
    per = (f"per 1000 output tokens ({tokens} tokens)" if load == "stream"
           else f"per 1000 requests ({requests} requests)")
    scale = 1000 / max(1, tokens if load == "stream" else requests)
    print(f"\n== profile: {load}, {CONCURRENCY} clients, {SECONDS:g} s; CPU seconds {per}")
    for n in pids:
        print(f"  {n:18s} {cpu[n] * scale:8.3f} s")
    for n in pids:
        raw = OUT / f"{load}-{n}.txt"
        if not raw.exists():
            print(f"\n-- {n}: no samples (py-spy failed)")
            continue
        total, functions, libraries = summarize(raw)
        if not total:
            continue
        print(f"\n-- {n}: {total} samples; by library (self):")
        print("   " + ", ".join(f"{lib} {100 * c / total:.0f}%" for lib, c in libraries))
        print("   top functions (self):")
        for f, c in functions:
            print(f"   {100 * c / total:5.1f}%  {f[:110]}")
    _flamegraphs(load, pids)


def _flamegraphs(load: str, pids: dict[str, int]) -> None:
    """SVGs from the raw stacks (py-spy can't re-render raw files; inferno isn't here): skip
    quietly unless ``flamegraph.pl`` is on PATH."""
    tool = shutil.which("flamegraph.pl")
    if tool is None:
        return
    for n in pids:
        raw = OUT / f"{load}-{n}.txt"
        if raw.exists():
            with open(OUT / f"{load}-{n}.svg", "wb") as out:
                subprocess.run([tool, str(raw)], stdout=out, check=False)


def run() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from fmapi_cli.system import GenerationSpec, System, SystemOptions
    from helpers.tiny_llm import TINY_ENGINE_ENV, build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "endpoints.yaml").write_text("""
endpoints:
  - name: tiny-chat
    task: llm/v1/chat
    served_entities: [{model: tiny}]
  - name: all-minilm-l6-v2
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
""")
        model = build_tiny_llama(tmp / "tiny")
        system = System(SystemOptions(runtime_dir=tmp / "run", http_port=0,
                                      endpoints_file=tmp / "endpoints.yaml",
                                      generation=[GenerationSpec("tiny", model, TINY_ENGINE_ENV)]))
        system.start()
        try:
            for load in ("stream", "embed"):
                _profile(system, load)
        finally:
            system.stop()
