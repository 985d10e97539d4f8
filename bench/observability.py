"""What observability costs: the same workloads through three fmapi systems running side by side:
"on" exports every request's spans (Envoy, every service, the vLLM engine's own) over OTLP to a
collector and keeps vLLM's engine metrics; "sampled" is the same with a tenth of the requests
traced (``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.1``: what
a busy deployment would run); "off" exports no spans and has the engine metrics off.

Rounds rotate (on sampled off, sampled off on, ...) after a warm-up of all three:
- generation: the tiny model, streaming OUTPUT_TOKENS tokens per request, CONCURRENCY at once:
  output tokens/s;
- embeddings: one sentence per request, CONCURRENCY at once: requests/s.
Prints each side's totals and the ratios on / off and sampled / off. Goal: >= 0.97 (under 3% of
throughput). The collector runs in this process, on the same two cores (its CPU counts against
the traced sides, as a collector beside the system would).

The gateway's own Prometheus counters and histograms are always on (they cannot be turned off);
a process with no OTLP endpoint makes no span for its internal gRPC calls (no tracing
interceptors) but still makes the gateway's request span (its trace id is every response's
``x-fmapi-trace-id``), so "off" saves the export, the engine's statistics and the per-call
tracing work.

Run: ``make bench observability`` (or ``python -m bench observability``).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
from concurrent import futures
from pathlib import Path

from .common import embeddings_rate, stream_rate, table
from .generation import ENGINE, OUTPUT_TOKENS, ROOT

CONCURRENCY = 8
ROUNDS = 6  # per side, rotating
SAMPLED = 0.1  # the share of requests the "sampled" side traces
GEN_REQUESTS = 32  # per round
EMBED_REQUESTS = 200  # per round
ENDPOINTS = """
endpoints:
  - name: all-minilm-l6-v2
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
  - name: tiny
    task: llm/v1/chat
    served_entities: [{model: tiny}]
"""


class _Sink:
    """An OTLP/gRPC trace receiver that counts spans and keeps nothing."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - gRPC method name
                n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                with sink.lock:
                    sink.spans += n
                return trace_service_pb2.ExportTraceServiceResponse()

        self.lock = threading.Lock()
        self.spans = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def _system(tmp: Path, name: str, model: Path, sink: _Sink | None, ratio: float = 1.0):
    from fmapi_cli.system import GenerationSpec, System, SystemOptions

    (tmp / "endpoints.yaml").write_text(ENDPOINTS)
    engine = {"FMAPI_GENERATION_MAX_MODEL_LEN": str(ENGINE["max_model_len"]),
              "FMAPI_GENERATION_CPU_KVCACHE_SPACE_GIB": str(ENGINE["kvcache_gib"]),
              "FMAPI_GENERATION_GPU_MEMORY_UTILIZATION": str(ENGINE["gpu_memory_utilization"]),
              "FMAPI_GENERATION_SEED": str(ENGINE["seed"]),
              "FMAPI_GENERATION_ENFORCE_EAGER": "true",
              "FMAPI_GENERATION_ENGINE_METRICS": "true" if sink else "false"}
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
           "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
           "OTEL_TRACES_SAMPLER_ARG": str(ratio)} if sink else {}
    system = System(SystemOptions(runtime_dir=tmp / name, http_port=0, env=env,
                                  endpoints_file=tmp / "endpoints.yaml",
                                  generation=[GenerationSpec("tiny", model, engine)]))
    system.start()
    return system


async def _embed(base_url: str, headers: dict, n: int) -> float:
    return await embeddings_rate(base_url, headers, n, CONCURRENCY)


async def _stream(base_url: str, headers: dict, n: int) -> float:
    return await stream_rate(base_url, headers, "tiny", n, CONCURRENCY, OUTPUT_TOKENS)


def run() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.tiny_llm import build_tiny_llama

    sink = _Sink()
    sides = ("on", "sampled", "off")
    gen: dict[str, list[float]] = {k: [] for k in sides}
    emb: dict[str, list[float]] = {k: [] for k in sides}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_llama(tmp / "tiny")
        systems = {"on": _system(tmp, "on", model, sink),
                   "sampled": _system(tmp, "sampled", model, sink, SAMPLED),
                   "off": _system(tmp, "off", model, None)}
        try:
            heads = {k: {"authorization": f"Bearer {s.admin_token}"} for k, s in systems.items()}
            for k, s in systems.items():  # warm-up
                asyncio.run(_stream(s.base_url, heads[k], 8))
                asyncio.run(_embed(s.base_url, heads[k], 50))
            for i in range(ROUNDS):
                for k in sides[i % 3:] + sides[:i % 3]:
                    s = systems[k]
                    gen[k].append(asyncio.run(_stream(s.base_url, heads[k], GEN_REQUESTS)))
                    emb[k].append(asyncio.run(_embed(s.base_url, heads[k], EMBED_REQUESTS)))
        finally:
            for s in systems.values():
                s.stop()
            sink.server.stop(0)

    def rows(name: str, unit: str, got: dict[str, list[float]]) -> list[tuple[str, str]]:
        m = {k: sum(v) / len(v) for k, v in got.items()}
        return [(f"{name} {unit}  on / sampled / off",
                 f"{m['on']:8.1f} / {m['sampled']:8.1f} / {m['off']:8.1f}"),
                (f"  {name} on / off", f"{m['on'] / m['off']:.3f} (goal >= 0.97)"),
                (f"  {name} sampled / off", f"{m['sampled'] / m['off']:.3f} (goal >= 0.97)"),
                *((f"  per round {k}", " ".join(f"{x:7.1f}" for x in got[k])) for k in sides)]

    table(f"observability: tracing + engine metrics on (every request, and {SAMPLED:g} of them) "
          f"vs off, {ROUNDS} rotating rounds per side, concurrency {CONCURRENCY}",
          [*rows("generation", "output tokens/s", gen), *rows("embeddings", "requests/s", emb),
           ("spans exported (on and sampled)", f"{sink.spans}")])
    mean = {k: sum(v) / len(v) for k, v in gen.items()}
    emean = {k: sum(v) / len(v) for k, v in emb.items()}
    return {"generation_ratio": mean["on"] / mean["off"], "embeddings_ratio": emean["on"] / emean["off"],
            "generation_sampled_ratio": mean["sampled"] / mean["off"],
            "embeddings_sampled_ratio": emean["sampled"] / emean["off"]}


if __name__ == "__main__":
    run()
