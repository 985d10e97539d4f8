"""Streaming generation: fmapi through Envoy, vLLM's own OpenAI server, and LiteLLM's proxy in
front of that same vLLM server, on the same engine.

What is compared, per model and concurrency (1, 16, 64):

* **vLLM**: ``python -m vllm.entrypoints.openai.api_server`` with the engine flags fmapi's
  generation service passes to vLLM (``ENGINE`` below: context length, KV cache size, memory
  share, eager mode, batch limits, chunked-prefill budget and per-request cap, seed, logprobs
  limit, structured-output backend; stats logging left at both sides' default, on).
* **fmapi**: the whole system as ``fmapi_cli.system.System`` starts it (``make run``'s way):
  Envoy (with ext_authz) -> gateway (auth identity, quota, routing, usage) -> generation service
  (the same engine flags, as ``FMAPI_GENERATION_*``). Its chat stop strings are turned off
  (``FMAPI_GENERATION_CHAT_STOP=[]``: the imported Gemma has ``\\nUser:`` ones that vLLM's
  server does not apply) so both sides run the same sampling.
* **LiteLLM**: its proxy (``litellm --config``, with a master key, from a venv of its own under
  .fmapi/bench, see ``bench/litellm_env.py``; never a dependency of fmapi) with a
  ``hosted_vllm/`` entry pointing at the vLLM server above, its settings otherwise its own
  (measured: when tokens come fast, as from the tiny model, it hands the stream on only once
  vLLM has ended it, whichever HTTP transport it uses; see litellm_env).

Models: the tiny random-weight Llama of the tests (the engine costs almost nothing: the figure is
mostly the front processes) and the bundled Gemma 3 270M (``make run``'s model, imported into
.fmapi/models once), where the engine's work is real.

Method (what makes the figures trustworthy):

* Every server is started at once and stays loaded; only one side is measured at a time.
* Same tokens on every side: each request asks for ``max_tokens`` = OUTPUT_TOKENS with
  ``ignore_eos``, temperature 0, no stop strings. Before measuring a model, one request per side
  checks that the sides return the same prompt token count and the same tokens (token by token
  and as text); every measured request must report ``usage.completion_tokens`` = OUTPUT_TOKENS,
  and prompt token counts must agree across sides prompt by prompt; anything else stops the
  benchmark (``Mismatch``).
* Tokens are counted per SSE event: each request asks for ``logprobs`` (no alternatives), and an
  event carries one logprob per token it brings, so an event carrying several tokens (vLLM
  merges deltas that queued up while its API server was busy) counts as several. Logprobs add
  the same work on every side: the engine's log-softmax per token (measured on Gemma 3 270M,
  vocabulary 262k: about 20% of vLLM's tokens/s at c=16, nothing visible at c=1) and one entry
  per token in each front end's JSON. A server that sends no event for a token whose text is
  empty drops that token's logprob: such tokens show in the "no-event" column (their time
  folds into the next event's gap); FMAPI_BENCH_GEN_STRICT=1 makes that an error.
  ``FMAPI_BENCH_GEN_LOGPROBS=0`` measures plain streams instead, each event with text counted
  as one token (inter-token gaps then approximate; totals still from ``usage``).
* Time stamps: :mod:`bench.sse`, a small HTTP/1.1 client that stamps each SSE event with the
  time of the socket read that brought it (no line-reader buffering) and decodes no JSON until a
  response has ended; its event loop runs at real-time priority (SCHED_FIFO) while measuring, so
  it reads each event when it arrives (on a busy 2-core machine a normal-priority client read
  80-96% of vLLM's c=1 events in the same read as the previous one: ITL p50 0.00 ms).
* TTFT = first event carrying a token - request written. ITL is per token: an event carrying k
  tokens, arriving g after the previous token-carrying event, counts as k gaps of g / k. TPOT =
  per request, (last token event - first token event) / tokens after the first event: unlike
  the ITL p50, a server that sends its events in bursts cannot make it small. "same-read" is the
  share of token events read together with the previous one of their stream (with the client
  at real-time priority: the server wrote them together).
* Rounds are interleaved after a warm-up (c requests of 8 tokens per side, discarded): round r
  measures the sides in rotated order (A B C, B C A, ...), each side ``REQUESTS[model][c]``
  requests from c workers (closed loop, one keep-alive connection each). Rounds go on until
  MIN_ROUNDS have run and, over the last MIN_ROUNDS, each side's per-round ratio to vLLM agrees
  within SPREAD_GOAL ((max - min) / median), or MAX_ROUNDS, or this cell's share of BUDGET_S is
  spent. Throughput = median per-round output tokens/s; ratios = median of the per-round ratios
  (each round's sides run back to back, so slow drifts of the machine cancel); latencies are
  pooled over the measured rounds. Every per-round figure and the spread are printed.
* CPU seconds outside the engine per 1000 output tokens, per process, from /proc/<pid>/stat
  (user + system) before and after each round: Envoy, auth, gateway, quota, routing, usage,
  Redis and the generation service's front process (the engine core is a child process of it:
  shown apart as "engine"); vLLM's API server process; LiteLLM's proxy (all its processes) plus
  the vLLM API server behind it. "client" is this benchmark's own process.

Knobs (environment): FMAPI_BENCH_GEN_MODELS (tiny,gemma-3-270m), FMAPI_BENCH_GEN_CONCURRENCY
(1,16,64), FMAPI_BENCH_GEN_SIDES (vllm,fmapi,litellm), FMAPI_BENCH_GEN_MIN_ROUNDS (3),
FMAPI_BENCH_GEN_MAX_ROUNDS (6), FMAPI_BENCH_GEN_SCALE (1: requests per round multiplier),
FMAPI_BENCH_GEN_BUDGET_S (600: measuring time beyond which no round past MIN_ROUNDS starts),
FMAPI_BENCH_GEN_LOGPROBS (1), FMAPI_BENCH_GEN_STRICT (0), FMAPI_BENCH_LITELLM_AIOHTTP (0).
Servers' logs: .fmapi/bench/generation/run-<pid>/logs (kept until the next run). On 2 cores the whole run
takes about 15 minutes, a third of it starting the servers.

Goals (issue 15): fmapi's output tokens/s >= 0.95 x vLLM's; TTFT p50 <= vLLM's + 5 ms; ITL p50
<= 1.05 x vLLM's; fmapi's ratio to vLLM better than LiteLLM's.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import sse
from .common import cpu_seconds, descendants, grid, median, pct, sentences, spread

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = ROOT / ".fmapi" / "bench" / "generation"


def _env_list(name: str, default: str) -> list[str]:
    return [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]


OUTPUT_TOKENS = 64
MODELS = _env_list("FMAPI_BENCH_GEN_MODELS", "tiny,gemma-3-270m")
CONCURRENCY = [int(x) for x in _env_list("FMAPI_BENCH_GEN_CONCURRENCY", "1,16,64")]
SIDES = _env_list("FMAPI_BENCH_GEN_SIDES", "vllm,fmapi,litellm")
MIN_ROUNDS = int(os.environ.get("FMAPI_BENCH_GEN_MIN_ROUNDS", "3"))
MAX_ROUNDS = int(os.environ.get("FMAPI_BENCH_GEN_MAX_ROUNDS", "6"))
SCALE = float(os.environ.get("FMAPI_BENCH_GEN_SCALE", "1"))
LOGPROBS = os.environ.get("FMAPI_BENCH_GEN_LOGPROBS", "1") not in ("0", "false", "no")
STRICT = os.environ.get("FMAPI_BENCH_GEN_STRICT", "0") not in ("0", "false", "no")
BUDGET_S = float(os.environ.get("FMAPI_BENCH_GEN_BUDGET_S", "600"))
# Pause after each side's round, inside its CPU window (work a server does after its responses
# ended, e.g. a proxy's logging callbacks, counts for it and does not slow the next side).
SETTLE_S = 0.5
# Idle CPU of every watched process, measured over this long once every server is up.
IDLE_S = 5.0
SPREAD_GOAL = 0.10

# Requests per round, per model and concurrency (a few seconds a side on 2 cores; Gemma at
# c=64 about 20 s).
REQUESTS = {
    "tiny": {1: 8, 16: 32, 64: 64},
    "gemma-3-270m": {1: 2, 16: 16, 64: 64},
}

# The engine flags, the same on both sides (fmapi: FMAPI_GENERATION_*; vLLM: its CLI flags).
ENGINE = {
    "max_model_len": 512,
    "kvcache_gib": 1,
    "gpu_memory_utilization": 0.2,  # fmapi's CPU default
    "enforce_eager": True,  # fmapi's CPU default
    "max_num_seqs": 64,
    "max_num_batched_tokens": 512,  # fmapi's CPU default
    "long_prefill_token_threshold": 256,  # fmapi's CPU default
    "seed": 0,
    "max_logprobs": 20,  # fmapi's max_top_logprobs default
    "structured_outputs": {"backend": "xgrammar", "disable_any_whitespace": True},
}
FMAPI_ENGINE_ENV = {
    "FMAPI_GENERATION_MAX_MODEL_LEN": str(ENGINE["max_model_len"]),
    "FMAPI_GENERATION_CPU_KVCACHE_SPACE_GIB": str(ENGINE["kvcache_gib"]),
    "FMAPI_GENERATION_GPU_MEMORY_UTILIZATION": str(ENGINE["gpu_memory_utilization"]),
    "FMAPI_GENERATION_ENFORCE_EAGER": "true",
    "FMAPI_GENERATION_MAX_NUM_SEQS": str(ENGINE["max_num_seqs"]),
    "FMAPI_GENERATION_MAX_NUM_BATCHED_TOKENS": str(ENGINE["max_num_batched_tokens"]),
    "FMAPI_GENERATION_LONG_PREFILL_TOKEN_THRESHOLD": str(ENGINE["long_prefill_token_threshold"]),
    "FMAPI_GENERATION_SEED": str(ENGINE["seed"]),
    "FMAPI_GENERATION_MAX_TOP_LOGPROBS": str(ENGINE["max_logprobs"]),
    "FMAPI_GENERATION_STRUCTURED_OUTPUTS_BACKEND": ENGINE["structured_outputs"]["backend"],
    "FMAPI_GENERATION_COMPACT_JSON": "true",
    # vLLM's server applies no stop strings: neither does fmapi here (same tokens).
    "FMAPI_GENERATION_CHAT_STOP": "[]",
}
PROMPTS = [f"Tell me a story about {s}" for s in sentences(64, seed=15)]
GOALS = {"tps": 0.95, "ttft_ms": 5.0, "itl": 1.05}
LABELS = {"vllm": "vLLM", "fmapi": "fmapi", "litellm": "LiteLLM"}


class Mismatch(RuntimeError):
    """The sides did not generate the same tokens (the comparison would be meaningless)."""


# ---------------------------------------------------------------------------- measuring


@dataclass
class Target:
    """One side serving one model: where to send requests and which processes to watch."""

    side: str
    model: str
    host: str
    port: int
    path: str
    headers: dict[str, str]
    # label -> pids whose CPU is added up (processes outside the engine)
    procs: dict[str, list[int]]
    engine: list[int]  # the engine's processes (shown apart)
    conns: list[sse.Connection] = field(default_factory=list)


@dataclass
class Result:
    """One streamed request."""

    prompt: int
    ttft: float
    tpot: float  # (last token event - first token event) / tokens after the first event
    gaps: list[float]  # per-token inter-token gaps (s)
    token_events: int
    same_read: int
    per_event: list[int]
    prompt_tokens: int
    completion_tokens: int
    tokens: list[str]
    text: str
    # Tokens in usage that no event carried (a logprob of), e.g. a server that sends no event
    # for a token whose text is empty drops its logprob too; without logprobs: tokens that did
    # not come in an event of their own.
    unseen: int = 0


@dataclass
class Round:
    side: str
    wall: float
    results: list[Result]
    cpu: dict[str, float]  # label -> CPU seconds during the round
    engine_cpu: float
    client_cpu: float

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall


def _body(model: str, prompt: int, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[prompt]}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if LOGPROBS:
        body["logprobs"] = True
    return body


def _parse(t: Target, prompt: int, max_tokens: int, resp: sse.Response) -> Result:
    """One streamed response's figures (after the round: no JSON work while streams run)."""
    usage = None
    stamps: list[tuple[float, int]] = []
    tokens: list[str] = []
    text = []
    for ts, ev in resp.json_events():
        if "error" in ev:
            raise RuntimeError(f"{t.side}: error event in the stream: {ev['error']}")
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices") or []:
            content = (ch.get("delta") or {}).get("content") or ""
            text.append(content)
            if LOGPROBS:
                lp = (ch.get("logprobs") or {}).get("content") or []
                tokens += [x["token"] for x in lp]
                k = len(lp)
            else:
                k = 1 if content else 0
            if k:
                stamps.append((ts, k))
    if usage is None:
        raise Mismatch(f"{t.side}/{t.model}: no usage chunk (stream_options.include_usage)")
    done = usage["completion_tokens"]
    counted = sum(k for _, k in stamps)
    if done != max_tokens:
        raise Mismatch(f"{t.side}/{t.model}: usage says {done} completion tokens, asked for "
                       f"exactly {max_tokens} (ignore_eos)")
    if LOGPROBS and counted > done:
        raise Mismatch(f"{t.side}/{t.model}: the stream's events carry {counted} tokens "
                       f"(logprobs), its usage says {done}")
    if LOGPROBS and counted < done and STRICT:
        raise Mismatch(f"{t.side}/{t.model}: the stream's events carry {counted} tokens "
                       f"(logprobs), its usage says {done} (FMAPI_BENCH_GEN_STRICT=0 goes on, "
                       f"reporting the shortfall)")
    gaps: list[float] = []
    same = 0
    for (a, _), (b, k) in itertools.pairwise(stamps):
        g = b - a
        same += g == 0
        gaps += [g / k] * k
    # Time per output token after the first event: bursts cannot make it look small.
    tpot = ((stamps[-1][0] - stamps[0][0]) / max(1, done - stamps[0][1])
            if len(stamps) > 1 else float("nan"))
    return Result(prompt, stamps[0][0] - resp.sent if stamps else float("nan"), tpot, gaps,
                  len(stamps), same, [k for _, k in stamps], usage["prompt_tokens"], done,
                  tokens, "".join(text), done - counted)


def _snapshot(t: Target) -> tuple[dict[str, float], float, float]:
    procs = {label: sum(cpu_seconds(p) for p in pids) for label, pids in t.procs.items()}
    eng = sum(cpu_seconds(p) for p in t.engine)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return procs, eng, ru.ru_utime + ru.ru_stime


async def _round(t: Target, concurrency: int, n: int, first_prompt: int = 0,
                 max_tokens: int = OUTPUT_TOKENS) -> Round:
    while len(t.conns) < concurrency:
        t.conns.append(sse.Connection(t.host, t.port))
    todo = list(range(first_prompt, first_prompt + n))[::-1]
    responses: list[tuple[int, sse.Response]] = []

    async def worker(conn):
        while todo:
            i = todo.pop() % len(PROMPTS)
            body = _body(t.model, i, max_tokens)
            responses.append((i, await conn.post(t.path, body, t.headers)))

    before = _snapshot(t)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(t.conns[w]) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    await asyncio.sleep(SETTLE_S)
    after = _snapshot(t)
    results = [_parse(t, i, max_tokens, resp) for i, resp in responses]
    cpu = {k: after[0][k] - before[0][k] for k in before[0]}
    return Round(t.side, wall, results, cpu, after[1] - before[1], after[2] - before[2])


# ------------------------------------------------------------------------------ servers


def _wait_http(url: str, child, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if not child.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start:\n{child.tail(40)}")
            time.sleep(0.5)


def _start_vllm(sup, name: str, model_dir: Path, port: int):
    """vLLM's own OpenAI server with fmapi's engine flags; returns the child (not yet ready)."""
    return sup.start(f"vllm-{name}", [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--tokenizer", str(model_dir), "--served-model-name", name,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "auto",
        "--max-model-len", str(ENGINE["max_model_len"]), "--tensor-parallel-size", "1",
        "--gpu-memory-utilization", str(ENGINE["gpu_memory_utilization"]), "--enforce-eager",
        "--max-num-seqs", str(ENGINE["max_num_seqs"]), "--enable-chunked-prefill",
        "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]),
        "--long-prefill-token-threshold", str(ENGINE["long_prefill_token_threshold"]),
        "--seed", str(ENGINE["seed"]), "--max-logprobs", str(ENGINE["max_logprobs"]),
        "--structured-outputs-config", json.dumps(ENGINE["structured_outputs"]),
        "--disable-uvicorn-access-log",
    ], {"VLLM_CPU_KVCACHE_SPACE": str(ENGINE["kvcache_gib"]), "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1"}, cwd=str(ROOT))


def _fmapi_system(models: dict[str, Path], tmp: Path):
    from fmapi_cli.system import GenerationSpec, System, SystemOptions

    lines = ["endpoints:", "  - name: all-minilm-l6-v2", "    task: llm/v1/embeddings",
             "    served_entities: [{model: all-minilm-l6-v2}]"]
    for name in models:
        lines += [f"  - name: {name}", "    task: llm/v1/chat", f"    served_entities: [{{model: {name}}}]"]
    (tmp / "endpoints.yaml").write_text("\n".join(lines) + "\n")
    return System(SystemOptions(
        runtime_dir=tmp / "fmapi", http_port=0, endpoints_file=tmp / "endpoints.yaml",
        generation=[GenerationSpec(n, p, dict(FMAPI_ENGINE_ENV)) for n, p in models.items()],
        ready_timeout=900))


def _model_dirs(tmp: Path) -> dict[str, Path]:
    out = {}
    for name in MODELS:
        if name == "tiny":
            sys.path.insert(0, str(ROOT / "tests"))
            from helpers.tiny_llm import build_tiny_llama

            out[name] = build_tiny_llama(tmp / "tiny")
        elif name == "gemma-3-270m":
            from fmapi_generation.modelimport import import_model

            # Where `make run` imports it (once; later runs find it there).
            out[name] = import_model(out_root=ROOT / ".fmapi" / "models", name=name)
        else:
            raise SystemExit(f"unknown model {name!r} in FMAPI_BENCH_GEN_MODELS")
    return out


# ------------------------------------------------------------------------------ the run


def _verify(model: str, firsts: dict[str, Result]) -> str:
    """Every side generated the same tokens for the same prompt; a line saying so."""
    ref_side = min(firsts, key=lambda s: firsts[s].unseen)
    ref = firsts[ref_side]
    notes = []
    for side, r in firsts.items():
        if r.prompt_tokens != ref.prompt_tokens:
            raise Mismatch(f"{model}: {side} counts {r.prompt_tokens} prompt tokens, "
                           f"{ref_side} {ref.prompt_tokens} (different chat templates?)")
        if r.text != ref.text:
            raise Mismatch(f"{model}: {side} and {ref_side} stream different text: "
                           f"{r.text[:80]!r} vs {ref.text[:80]!r}")
        if not LOGPROBS:
            continue
        if r.unseen:  # its stream dropped some tokens' logprobs: compare what it sent
            it = iter(ref.tokens)
            if not all(tok in it for tok in r.tokens):
                raise Mismatch(f"{model}: {side}'s tokens are not {ref_side}'s")
            notes.append(f"{LABELS[side]} sent no event for {r.unseen} of them")
        elif r.tokens != ref.tokens:
            at = next((i for i, (a, b) in enumerate(zip(r.tokens, ref.tokens)) if a != b),
                      min(len(r.tokens), len(ref.tokens)))
            raise Mismatch(f"{model}: {side} and {ref_side} generate different tokens from "
                           f"token {at}: {r.tokens[at:at + 5]} vs {ref.tokens[at:at + 5]}")
    events = ", ".join(f"{LABELS[s]} {r.token_events}" for s, r in firsts.items())
    how = "token by token (logprobs) and by text" if LOGPROBS else "by text"
    return (f"{model}: every side generates the same {ref.completion_tokens} tokens ({how}) "
            f"from the same {ref.prompt_tokens}-token prompt; token-carrying events per request "
            f"at c=1: {events}" + (f" ({'; '.join(notes)})" if notes else ""))


def _ratios_stable(rounds: dict[str, list[Round]]) -> bool:
    """Whether the last MIN_ROUNDS rounds agree within SPREAD_GOAL: each side's per-round ratio
    to vLLM (the sides of one round run back to back, so slow drifts of the machine cancel), or
    each side's own tokens/s where vLLM is not measured."""
    last = {s: rs[-MIN_ROUNDS:] for s, rs in rounds.items()}
    if "vllm" not in last:
        return all(spread([r.tps for r in rs]) <= SPREAD_GOAL for rs in last.values())
    if len(last) == 1:
        return spread([r.tps for r in last["vllm"]]) <= SPREAD_GOAL
    return all(spread([a.tps / b.tps for a, b in zip(rs, last["vllm"])]) <= SPREAD_GOAL
               for s, rs in last.items() if s != "vllm")


def _client_priority() -> str:
    """Run this thread (the client's event loop) at real-time priority, so it reads each event
    when it arrives rather than when the scheduler gets round to it: on a busy 2-core machine a
    plain client reads events in bursts (measured: 80-96% of vLLM's events at c=1 arrived in the
    same read as the one before, ITL p50 0.00 ms; with SCHED_FIFO none did, p50 2.7 ms). The
    client does little per read, so it takes the same small share from every side."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        return "SCHED_FIFO"
    except (PermissionError, AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -10)
            return "nice -10"
        except OSError:
            return "normal priority (not root: events may be read in bursts)"


def _client_priority_reset() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (PermissionError, AttributeError, OSError):
        pass


async def _measure(targets: dict[str, dict[str, Target]]) -> dict:
    print(f"client at {_client_priority()}", flush=True)
    try:
        return await _measure_all(targets)
    finally:
        _client_priority_reset()


async def _idle(targets: dict[str, dict[str, Target]]) -> dict[str, dict[str, float]]:
    """CPU ms per second of each watched process while nothing is asked of any server."""
    flat = {(m, s): t for m, sides in targets.items() for s, t in sides.items()}
    before = {k: _snapshot(t) for k, t in flat.items()}
    await asyncio.sleep(IDLE_S)
    out: dict[str, dict[str, float]] = {}
    for (m, s), t in flat.items():
        after = _snapshot(t)
        rates = {k: (after[0][k] - before[(m, s)][0][k]) / IDLE_S * 1000 for k in after[0]}
        rates["engine"] = (after[1] - before[(m, s)][1]) / IDLE_S * 1000
        out.setdefault(m, {})[s] = rates
    return out


async def _measure_all(targets: dict[str, dict[str, Target]]) -> dict:
    idle = await _idle(targets)
    t_start = time.monotonic()
    cells = len(targets) * len(CONCURRENCY)
    cell = 0
    out: dict = {}
    for model, sides in targets.items():
        # Verification: one request per side, c=1, the same prompt.
        firsts = {}
        for side, t in sides.items():
            rnd = await _round(t, 1, 1)
            firsts[side] = rnd.results[0]
        print(f"verified {_verify(model, firsts)}", flush=True)
        out[model] = {}
        for c in CONCURRENCY:
            cell += 1
            n = max(c, round(REQUESTS.get(model, {}).get(c, 2 * c) * SCALE))
            print(f"{model} c={c}: {n} requests per round; warm-up ...", flush=True)
            # Warm-up: opens the c connections and runs batches of c (short generations).
            for t in sides.values():
                await _round(t, c, c, max_tokens=8)
            rounds: dict[str, list[Round]] = {s: [] for s in sides}
            order = list(sides)
            for r in range(MAX_ROUNDS):
                k = r % len(order)
                t0 = time.monotonic()
                for side in order[k:] + order[:k]:
                    rnd = await _round(sides[side], c, n, first_prompt=r * n)
                    rounds[side].append(rnd)
                took = time.monotonic() - t0
                line = "  ".join(f"{LABELS[s]} {rounds[s][-1].tps:7.1f}" for s in sides)
                print(f"  {model} c={c} round {r + 1}: tok/s  {line}", flush=True)
                if r + 1 < MIN_ROUNDS:
                    continue
                if _ratios_stable(rounds):
                    break
                # Another round only if it fits this cell's share of the time budget.
                if r + 1 == MAX_ROUNDS or time.monotonic() - t_start + took > BUDGET_S * cell / cells:
                    why = "MAX_ROUNDS reached" if r + 1 == MAX_ROUNDS else "time budget spent"
                    print(f"  {model} c={c}: the last {MIN_ROUNDS} rounds' ratios to vLLM still "
                          f"disagree by more than {SPREAD_GOAL:.0%} ({why})", flush=True)
                    break
            out[model][c] = rounds
    out["_idle"] = idle
    return out


def _prompt_tokens_agree(results: dict) -> None:
    for model, by_c in results.items():
        if model == "_idle":
            continue
        seen: dict[int, tuple[str, int]] = {}
        for rounds in by_c.values():
            for side, rs in rounds.items():
                for rnd in rs:
                    for res in rnd.results:
                        prev = seen.setdefault(res.prompt, (side, res.prompt_tokens))
                        if prev[1] != res.prompt_tokens:
                            raise Mismatch(f"{model}: prompt {res.prompt} is {prev[1]} tokens on "
                                           f"{prev[0]}, {res.prompt_tokens} on {side}")


def _summary(rs: list[Round]) -> dict:
    results = [x for r in rs for x in r.results]
    gaps = [g for x in results for g in x.gaps]
    ev = sum(x.token_events for x in results)
    tokens = sum(r.tokens for r in rs)
    cpu: dict[str, float] = {}
    for r in rs:
        for k, v in r.cpu.items():
            cpu[k] = cpu.get(k, 0.0) + v
    per_k = 1000 / tokens
    return {
        "tps": median([r.tps for r in rs]), "tps_rounds": [r.tps for r in rs],
        "spread": spread([r.tps for r in rs]),
        "ttft50": median([x.ttft for x in results]) * 1000,
        "ttft99": pct([x.ttft for x in results], 99) * 1000,
        "itl50": median(gaps) * 1000, "itl99": pct(gaps, 99) * 1000,
        "tpot50": median([x.tpot for x in results]) * 1000,
        "events": ev / len(results), "same_read": sum(x.same_read for x in results) / max(1, ev),
        "unseen": sum(x.unseen for x in results) / tokens,
        "cpu": {k: v * per_k for k, v in cpu.items()},
        "engine_cpu": sum(r.engine_cpu for r in rs) * per_k,
        "client_cpu": sum(r.client_cpu for r in rs) * per_k,
    }


def _goal(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _report(results: dict, started: str) -> dict:
    summary: dict = {}
    idle = results.pop("_idle", {})
    for model, by_c in results.items():
        summary[model] = {}
        rows, notes, cpu_rows = [], [], []
        for c, rounds in by_c.items():
            s = {side: _summary(rs) for side, rs in rounds.items()}
            summary[model][c] = s
            for side, x in s.items():
                rows.append([f"c={c}", LABELS[side], f"{x['tps']:.1f}",
                             " ".join(f"{v:.0f}" for v in x["tps_rounds"]),
                             f"{x['spread'] * 100:.0f}%", f"{x['ttft50']:.1f}", f"{x['ttft99']:.1f}",
                             f"{x['itl50']:.2f}", f"{x['itl99']:.2f}", f"{x['tpot50']:.2f}",
                             f"{x['events']:.1f}",
                             f"{x['same_read'] * 100:.0f}%", f"{x['unseen'] * 100:.1f}%"])
                labels = sorted(x["cpu"])
                cpu_rows.append([f"c={c}", LABELS[side],
                                 f"{sum(x['cpu'].values()):.3f}",
                                 " ".join(f"{k} {x['cpu'][k]:.3f}" for k in labels),
                                 f"{x['engine_cpu']:.3f}", f"{x['client_cpu']:.3f}"])
            if "vllm" not in s:
                continue
            v = s["vllm"]
            for side in (x for x in s if x != "vllm"):
                f = s[side]
                per_round = [a.tps / b.tps for a, b in zip(rounds[side], rounds["vllm"])]
                ratio = median(per_round)
                ttft_d = f["ttft50"] - v["ttft50"]
                itl_r = f["itl50"] / v["itl50"] if v["itl50"] else float("nan")
                tpot_r = f["tpot50"] / v["tpot50"] if v["tpot50"] else float("nan")
                s[side]["ratio"] = ratio
                line = (f"c={c:<2} {LABELS[side]:>7}/vLLM: tok/s {ratio:.2f} (rounds "
                        f"{' '.join(f'{r:.2f}' for r in per_round)}, spread "
                        f"{spread(per_round) * 100:.0f}%)")
                if side == "fmapi":
                    line += (f" goal >= {GOALS['tps']:.2f} {_goal(ratio >= GOALS['tps'])};"
                             f"  TTFT p50 {ttft_d:+.1f} ms goal <= +{GOALS['ttft_ms']:.0f} "
                             f"{_goal(ttft_d <= GOALS['ttft_ms'])};"
                             f"  ITL p50 {itl_r:.2f}x goal <= {GOALS['itl']:.2f} "
                             f"{_goal(itl_r <= GOALS['itl'])};  TPOT p50 {tpot_r:.2f}x "
                             f"(same goal) {_goal(tpot_r <= GOALS['itl'])}")
                else:
                    line += (f";  TTFT p50 {ttft_d:+.1f} ms;  ITL p50 {itl_r:.2f}x;  "
                             f"TPOT p50 {tpot_r:.2f}x")
                notes.append(line)
            if "fmapi" in s and "litellm" in s:
                better = s["fmapi"]["ratio"] > s["litellm"]["ratio"]
                notes.append(f"c={c:<2} fmapi/vLLM {s['fmapi']['ratio']:.2f} vs LiteLLM/vLLM "
                             f"{s['litellm']['ratio']:.2f}: goal fmapi better {_goal(better)}")
        how = ("tokens counted per SSE event from logprobs" if LOGPROBS
               else "each SSE event with text counted as one token")
        grid(f"generation: {model}, streaming chat, {OUTPUT_TOKENS} tokens per request "
             f"(ignore_eos, temperature 0), {how}; vLLM's own server vs fmapi through Envoy "
             f"vs LiteLLM's proxy in front of vLLM",
             ["conc", "side", "tok/s", "per round", "spread", "TTFT p50", "TTFT p99",
              "ITL p50", "ITL p99", "TPOT p50", "tok ev/req", "same-read", "no-event"], rows,
             [("(tok/s: median of rounds; latencies in ms, pooled over the rounds; spread: "
               "(max - min) / median of the rounds; tok ev/req: events carrying tokens per "
               "request; same-read: token events read together with the previous one; "
               "no-event: tokens in usage that no event carried a logprob for (without "
               "logprobs: that came in another token's event))"), *notes])
        for side, rates in idle.get(model, {}).items():
            procs = {k: v for k, v in rates.items() if k != "engine"}
            cpu_rows.append(["idle", LABELS[side], f"{sum(procs.values()):.1f}",
                             " ".join(f"{k} {procs[k]:.1f}" for k in sorted(procs)),
                             f"{rates['engine']:.1f}", ""])
        grid(f"generation: {model}, CPU seconds per 1000 output tokens, outside the engine, "
             "per process", ["conc", "side", "total", "per process", "engine", "client"],
             cpu_rows, [("(LiteLLM's row includes the vLLM server's front process it calls; "
                         "engine: the engine core process(es), not in the total; client: this "
                         "benchmark's process; a side's CPU window is its round plus "
                         f"{SETTLE_S} s after it; idle rows: CPU milliseconds per second with "
                         "no request anywhere (measured for 5 s once every server is up), which "
                         "the per-1000-token figures include: at Gemma's c=1 rate of ~10 "
                         "tokens/s, 1 ms/s idle adds 0.1 s per 1000 tokens)")])
    print(f"\n(started {started}; litellm {_litellm_version()}; "
          f"vLLM {_vllm_version()}; {os.cpu_count()} CPUs)")
    return summary


def _litellm_version() -> str:
    from . import litellm_env

    return litellm_env.version()


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def run() -> dict:
    from fmapi_cli.supervisor import Supervisor

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.redis_server import free_port

    from . import litellm_env

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    if "litellm" in SIDES:
        litellm_env.ensure()
    # The servers' logs and runtime files stay after the run, in a folder of this run's own (a
    # second run at the same time must not remove the first one's files); older runs' folders
    # go once their run has ended.
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    for old in RUN_DIR.glob("run-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(old, ignore_errors=True)
    work = RUN_DIR / f"run-{os.getpid()}"
    work.mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        models = _model_dirs(Path(tmp))
        tmp = work
        sup = Supervisor(tmp / "logs", grace=15)
        system = None
        try:
            t0 = time.monotonic()
            vllm_ports = {}
            vllm_children = {}
            if "vllm" in SIDES or "litellm" in SIDES:
                for name, path in models.items():
                    vllm_ports[name] = free_port()
                    vllm_children[name] = _start_vllm(sup, name, path, vllm_ports[name])
            litellm = None
            if "litellm" in SIDES:
                litellm = litellm_env.start(
                    sup, {n: f"http://127.0.0.1:{p}/v1" for n, p in vllm_ports.items()}, tmp,
                    free_port())
            if "fmapi" in SIDES:
                system = _fmapi_system(models, tmp)
                system.start()
            for name, child in vllm_children.items():
                _wait_http(f"http://127.0.0.1:{vllm_ports[name]}/health", child, 900,
                           f"vllm serve {name}")
            print(f"generation: every server up in {time.monotonic() - t0:.0f}s "
                  f"(logs in {tmp})", flush=True)

            targets: dict[str, dict[str, Target]] = {}
            for name in models:
                sides: dict[str, Target] = {}
                for side in SIDES:
                    if side in ("vllm", "litellm"):
                        vpid = vllm_children[name].proc.pid
                        engine = descendants(vpid)
                        front = {"vllm-front": [vpid]}
                    if side == "vllm":
                        sides[side] = Target(side, name, "127.0.0.1", vllm_ports[name],
                                             "/v1/chat/completions", {}, front, engine)
                    elif side == "litellm":
                        child, base, key = litellm
                        lpid = child.proc.pid
                        port = int(base.rsplit(":", 1)[1])
                        sides[side] = Target(side, name, "127.0.0.1", port, "/v1/chat/completions",
                                             {"Authorization": f"Bearer {key}"}, {"litellm": [lpid, *descendants(lpid)], **front},
                                             engine)
                    elif side == "fmapi":
                        gen = system.child(f"generation-{name}").proc.pid
                        procs = {n: [system.child(n).proc.pid] for n in
                                 ("envoy", "auth", "gateway", "quota", "routing", "usage", "redis")}
                        procs["gen-front"] = [gen]
                        sides[side] = Target(
                            side, name, "127.0.0.1", system.http_port, "/v1/chat/completions",
                            {"Authorization": f"Bearer {system.admin_token}"}, procs,
                            descendants(gen))
                targets[name] = sides
            try:
                import uvloop

                results = uvloop.run(_measure(targets))
            except ImportError:
                results = asyncio.run(_measure(targets))
            _prompt_tokens_agree(results)
            return _report(results, started)
        finally:
            if system is not None:
                system.stop()
            sup.stop()


if __name__ == "__main__":
    run()
