"""Wiring: config -> gRPC server (NOT_SERVING), vLLM engine, SERVING, registration with routing.

The server listens (and writes its port file) at once, so a supervisor sees the process alive
while the model loads; health answers NOT_SERVING and Generate answers UNAVAILABLE until the
engine is loaded and warmed up. If the engine dies later, health flips to NOT_SERVING and the
process exits with status 1 so its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

from fmapi.generation.v1 import generation_pb2, generation_pb2_grpc
from fmapi.routing.v1 import routing_pb2
from fmapi_common.errors import Unavailable
from fmapi_common.admission import Admitter
from fmapi_common.replica import ReplicaRegistration
from fmapi_common.server import GrpcService, start_grpc_service
from fmapi_common.telemetry import setup_telemetry
from fmapi_common.tls import GATEWAY

from .config import GenerationConfig
from .domain import EngineSampling
from .engine import Engine, VllmEngine
from .grammar import grammar_checker
from .service import GenerationService
from .servicer import GenerationServicer
from .validation import Limits

SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
log = logging.getLogger(__name__)


class _Loading:
    """Stands in for the servicer until the engine is ready."""

    async def Generate(self, request, context):
        raise Unavailable("the model is still loading", retry_after=5)
        yield  # pragma: no cover - makes this an async generator

    async def GetModelInfo(self, request, context):
        raise Unavailable("the model is still loading", retry_after=5)

    CountTokens = GetModelInfo


class _Switch(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self) -> None:
        self.target = _Loading()

    def Generate(self, request, context):
        return self.target.Generate(request, context)

    def GetModelInfo(self, request, context):
        return self.target.GetModelInfo(request, context)

    def CountTokens(self, request, context):
        return self.target.CountTokens(request, context)


def served_name(config: GenerationConfig) -> str:
    return config.served_model_name or Path(config.model_path.rstrip("/")).name


def read_chat_template(config: GenerationConfig) -> str | None:
    if not config.chat_template:
        return None
    try:
        return Path(config.chat_template).read_text()
    except OSError as exc:
        raise SystemExit(
            f"generation: cannot read chat template {config.chat_template}: {exc}"
        ) from None


def chat_stop(config: GenerationConfig) -> list[str]:
    """Stop strings for chat: the config's, else the model's generation_config.json ones."""
    if config.chat_stop is not None:
        return config.chat_stop
    try:
        gc = json.loads(Path(config.model_path, "generation_config.json").read_text())
    except (OSError, ValueError):
        return []
    stops = gc.get("stop_strings") or []
    return [stops] if isinstance(stops, str) else [x for x in stops if isinstance(x, str) and x]


async def warmup(service: GenerationService) -> None:
    """One short generation, so lazy initialisation does not land on the first caller."""
    ids = service.renderer.encode("Hello")
    sampling = EngineSampling(max_tokens=2, logprobs=1)
    async for _ in service.engine.generate(ids, sampling, "warmup"):
        pass


async def create(config: GenerationConfig) -> tuple[GrpcService, asyncio.Task]:
    """Start listening now; the returned task loads the model and then reports SERVING."""
    setup_telemetry("generation")
    if not Path(config.model_path, "config.json").is_file():
        raise SystemExit(
            f"generation: {config.model_path} is not a model directory (no config.json); "
            "create one with `fmapi models import`"
        )
    template = read_chat_template(config)
    name = served_name(config)
    switch = _Switch()

    def register(server):
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(switch, server)
        return [SERVICE]

    svc = await start_grpc_service(
        config, register, policy={f"/{SERVICE}/": [GATEWAY]}, serving=False
    )

    async def load() -> Engine:
        engine = await VllmEngine.start(config, name)
        svc.on_stop.append(engine.close)
        grammar = await grammar_checker(config, engine)
        if grammar is not None:
            svc.on_stop.append(grammar.close)
        limits = Limits(
            max_n=config.max_n,
            max_top_logprobs=config.max_top_logprobs,
            auto_tools=config.tool_call_parser is not None,
            model=name,
            max_prompt_tokens=config.max_prompt_tokens,
            max_schema_bytes=config.max_schema_bytes,
        )
        service = GenerationService(engine, limits, template, chat_stop(config), grammar)
        if config.warmup:
            await warmup(service)
        admitter = (Admitter.connect(config.quota_addr, config.tls(), config.quota_timeout_seconds)
                    if config.quota_addr else None)
        if admitter is not None:
            svc.on_stop.append(admitter.close)
        switch.target = GenerationServicer(service, admitter)
        await svc.set_serving(True)
        log.info("serving %s on port %d", name, svc.port)
        if config.routing_addr:
            host = config.advertise_host or config.host
            reg = ReplicaRegistration(
                config.routing_addr,
                routing_pb2.Replica(
                    address=f"{host}:{svc.port}",
                    kind=routing_pb2.REPLICA_KIND_GENERATION,
                    models=[name],
                    dedicated_endpoint=config.dedicated_endpoint or "",
                ),
                inflight=lambda: service.inflight,
                tls=config.tls(),
            )
            await reg.start()
            # Deregister first on shutdown, so routing stops sending work here.
            svc.on_drain.append(reg.stop)
        return engine

    return svc, asyncio.create_task(load(), name="load-engine")


async def _watch(loading: asyncio.Task, failed: list[str]) -> None:
    """Stop the process when the engine fails to load or dies."""
    try:
        engine = await loading
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - any load failure ends the process
        log.exception("the model failed to load")
        failed.append(f"model failed to load: {exc}")
        os.kill(os.getpid(), signal.SIGTERM)
        return
    while True:
        await asyncio.sleep(2)
        if engine.dead():
            log.error("the vLLM engine died; shutting down so the replica restarts")
            failed.append("engine died")
            os.kill(os.getpid(), signal.SIGTERM)
            return


async def serve(config: GenerationConfig) -> None:
    svc, loading = await create(config)
    failed: list[str] = []
    watcher = asyncio.create_task(_watch(loading, failed))
    try:
        await svc.serve_until_signal()
    finally:
        watcher.cancel()
        if not loading.done():
            loading.cancel()
    if failed:
        raise SystemExit(f"generation: {failed[0]}")
