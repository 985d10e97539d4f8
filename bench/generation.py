"""Streaming generation: fmapi through Envoy against vLLM's own OpenAI server, same engine.

Both serve the same tiny random-weight model with the same engine flags on this machine, in the
same run (the two servers take turns: only one is loaded while the other is measured). Each
request streams exactly OUTPUT_TOKENS tokens (ignore_eos). Reported at concurrency 1 and 16:
output tokens/s, time to first token and inter-token latency (p50, p99).
Goals: fmapi throughput >= 0.9 x vLLM's, inter-token latency p50 <= 1.1 x.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from .common import median, pct, table

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_TOKENS = 64
ROUNDS = {1: 12, 16: 48}  # requests per concurrency level
ENGINE = {"max_model_len": 256, "kvcache_gib": 1, "gpu_memory_utilization": 0.2, "seed": 0}
MESSAGES = [{"role": "user", "content": "hello there, tell me about the weather in the city"}]


async def _one(client, url: str, headers: dict, model: str) -> tuple[float, list[float], int]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": OUTPUT_TOKENS, "stream": True,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", url, json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if first is None:
                    first = now - t0
                stamps.append(now)
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return first or float("nan"), itl, tokens


async def _load(url: str, headers: dict, model: str, concurrency: int, n: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await _one(client, url, headers, model)  # warm-up
        pending = list(range(n))
        ttft, itl, tokens = [], [], 0

        async def worker():
            nonlocal tokens
            while pending:
                pending.pop()
                f, gaps, t = await _one(client, url, headers, model)
                ttft.append(f)
                itl.extend(gaps)
                tokens += t

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"tps": tokens / wall, "ttft50": median(ttft) * 1000, "ttft99": pct(ttft, 99) * 1000,
            "itl50": median(itl) * 1000, "itl99": pct(itl, 99) * 1000}


def _vllm_server(model_dir: Path, tmp: Path):
    from fmapi_cli.supervisor import Supervisor

    from helpers.redis_server import free_port

    port = free_port()
    sup = Supervisor(tmp / "vllm-logs", grace=15)
    child = sup.start("vllm", [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(ENGINE["max_model_len"]), "--enforce-eager",
        "--gpu-memory-utilization", str(ENGINE["gpu_memory_utilization"]),
        "--seed", str(ENGINE["seed"]), "--disable-log-stats", "--disable-uvicorn-access-log",
    ], {"VLLM_CPU_KVCACHE_SPACE": str(ENGINE["kvcache_gib"]), "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1"})
    import urllib.request

    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
        except OSError:
            if not child.alive() or time.monotonic() > deadline:
                sup.stop()
                raise RuntimeError(f"vllm serve did not start:\n{child.tail(40)}")
            time.sleep(0.5)
    return sup, f"http://127.0.0.1:{port}/v1/chat/completions"


def _fmapi_system(model_dir: Path, tmp: Path):
    from fmapi_cli.system import GenerationSpec, System, SystemOptions

    (tmp / "endpoints.yaml").write_text(
        "endpoints:\n"
        "  - name: all-minilm-l6-v2\n    task: llm/v1/embeddings\n"
        "    served_entities: [{model: all-minilm-l6-v2}]\n"
        "  - name: tiny\n    task: llm/v1/chat\n    served_entities: [{model: tiny}]\n"
    )
    env = {"FMAPI_GENERATION_MAX_MODEL_LEN": str(ENGINE["max_model_len"]),
           "FMAPI_GENERATION_CPU_KVCACHE_SPACE_GIB": str(ENGINE["kvcache_gib"]),
           "FMAPI_GENERATION_GPU_MEMORY_UTILIZATION": str(ENGINE["gpu_memory_utilization"]),
           "FMAPI_GENERATION_SEED": str(ENGINE["seed"]),
           "FMAPI_GENERATION_ENFORCE_EAGER": "true"}
    system = System(SystemOptions(runtime_dir=tmp / "fmapi", http_port=0,
                                  endpoints_file=tmp / "endpoints.yaml",
                                  generation=[GenerationSpec("tiny", model_dir, env)]))
    system.start()
    return system


def run() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.tiny_llm import build_tiny_llama

    results: dict[str, dict[int, dict]] = {"vllm": {}, "fmapi": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_llama(tmp / "tiny")
        sup, url = _vllm_server(model, tmp)
        try:
            for c, n in ROUNDS.items():
                results["vllm"][c] = asyncio.run(_load(url, {}, "tiny", c, n))
        finally:
            sup.stop()
        system = _fmapi_system(model, tmp)
        try:
            headers = {"authorization": f"Bearer {system.admin_token}"}
            for c, n in ROUNDS.items():
                results["fmapi"][c] = asyncio.run(
                    _load(f"{system.base_url}/v1/chat/completions", headers, "tiny", c, n))
        finally:
            system.stop()

    rows = []
    for c in ROUNDS:
        v, f = results["vllm"][c], results["fmapi"][c]
        rows += [
            (f"c={c:<2} output tokens/s   vLLM / fmapi", f"{v['tps']:8.1f} / {f['tps']:8.1f}   ratio {f['tps'] / v['tps']:.2f} (goal >= 0.90)"),
            (f"c={c:<2} TTFT p50 ms       vLLM / fmapi", f"{v['ttft50']:8.1f} / {f['ttft50']:8.1f}   ratio {f['ttft50'] / v['ttft50']:.2f}"),
            (f"c={c:<2} TTFT p99 ms       vLLM / fmapi", f"{v['ttft99']:8.1f} / {f['ttft99']:8.1f}"),
            (f"c={c:<2} ITL p50 ms        vLLM / fmapi", f"{v['itl50']:8.2f} / {f['itl50']:8.2f}   ratio {f['itl50'] / v['itl50']:.2f} (goal <= 1.10)"),
            (f"c={c:<2} ITL p99 ms        vLLM / fmapi", f"{v['itl99']:8.2f} / {f['itl99']:8.2f}"),
        ]
    table(f"generation: tiny model, streaming {OUTPUT_TOKENS} tokens per request, "
          "vLLM's own server vs fmapi through Envoy", rows)
    return results
