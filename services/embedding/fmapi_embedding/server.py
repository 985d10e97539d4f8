"""Wiring: config -> models, batchers, gRPC server, registration with routing."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from fmapi.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from fmapi.routing.v1 import routing_pb2
from fmapi_common.admission import Admitter
from fmapi_common.cpus import usable_cpus
from fmapi_common.replica import ReplicaRegistration
from fmapi_common.server import GrpcService, start_grpc_service
from fmapi_common.telemetry import setup_telemetry
from fmapi_common.tls import GATEWAY

from .batcher import DynamicBatcher
from .config import EmbeddingConfig
from .model import SentenceTransformerEncoder
from .service import Embedder, HostedModel
from .servicer import EmbeddingServicer

SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
log = logging.getLogger(__name__)


def _async(close):
    """A synchronous close as the awaitable shutdown hook the server expects."""

    async def hook() -> None:
        close()

    return hook


def _threads_per_lane(config: EmbeddingConfig) -> int | None:
    """On CPU, the cores this process may use shared among the batch lanes, so that batches
    running side by side do not fight over cores (torch's threads spin at every barrier while a
    peer thread waits for a core, and on a busy machine that is most of a batch's time)."""
    if config.device != "cpu":
        return None
    return max(1, len(usable_cpus()) // config.batch_lanes)


async def create(config: EmbeddingConfig) -> GrpcService:
    setup_telemetry("embedding")
    threads = config.torch_threads or _threads_per_lane(config)
    if threads:
        import torch

        torch.set_num_threads(threads)
    # Per model, ``batch_lanes`` batches may run at once, each in its own executor thread with
    # its share of the cores (torch's intra-op threads).
    hosted: dict[str, HostedModel] = {}
    for name, path in config.models.items():
        encoder = await asyncio.to_thread(SentenceTransformerEncoder, name, path, config.device)
        executor = ThreadPoolExecutor(max_workers=config.batch_lanes, thread_name_prefix=f"embed-{name}")
        batcher = DynamicBatcher(
            encoder.encode,
            executor=executor,
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_wait=config.max_wait_ms / 1000,
            lanes=config.batch_lanes,
            name=name,
        )
        hosted[name] = HostedModel(encoder, batcher)
    embedder = Embedder(hosted, config.max_inputs, config.admit_linger_ms / 1000)
    admitter = (Admitter.connect(config.quota_addr, config.tls(), config.quota_timeout_seconds)
                if config.quota_addr else None)
    if admitter is not None:
        for h in hosted.values():  # a free lane with nothing ready: the waiting admissions go
            h.batcher.on_idle_lane = admitter.flush

    def register(server):
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(
            EmbeddingServicer(embedder, admitter), server)
        return [SERVICE]

    svc = await start_grpc_service(config, register, policy={f"/{SERVICE}/": [GATEWAY]})
    if admitter is not None:
        svc.on_stop.append(admitter.close)
    for h in hosted.values():
        svc.on_stop.append(h.batcher.close)
        svc.on_stop.append(_async(h.lanes.close))
    if config.routing_addr:
        reg = ReplicaRegistration(
            config.routing_addr,
            routing_pb2.Replica(
                address=f"{config.advertise_host or config.host}:{svc.port}",
                kind=routing_pb2.REPLICA_KIND_EMBEDDING,
                models=list(hosted),
            ),
            inflight=lambda: sum(h.batcher.inflight for h in hosted.values()),
            tls=config.tls(),
        )
        await reg.start()
        # Deregister first on shutdown, so routing stops sending work here.
        svc.on_drain.append(reg.stop)
    return svc


async def serve(config: EmbeddingConfig) -> None:
    svc = await create(config)
    await svc.serve_until_signal()
