"""Wiring: config -> Redis store, service, reaper, gRPC server."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from fmapi.quota.v1 import quota_pb2_grpc
from fmapi_common import tasks
from fmapi_common.redis_client import make_redis as make_client
from fmapi_common.server import GrpcService, start_grpc_service
from fmapi_common.telemetry import setup_telemetry
from fmapi_common.tls import GATEWAY, MODEL_SERVERS

from .config import QuotaConfig
from .service import QuotaService
from .servicer import SERVICE_NAME, QuotaServicer
from .store import QuotaStore

# The gateway meters every request; a model server may only admit (it counts the tokens of the
# requests the gateway hands it with their admission attached).
POLICY = {f"/{SERVICE_NAME}/": [GATEWAY],
          f"/{SERVICE_NAME}/Admit": [GATEWAY, *MODEL_SERVERS],
          f"/{SERVICE_NAME}/AdmitMany": [GATEWAY, *MODEL_SERVERS]}


def make_redis(config: QuotaConfig) -> aioredis.Redis:
    return make_client(config.redis_url, name="quota", timeout=config.redis_timeout_seconds,
                       pool_wait=config.redis_pool_wait_seconds,
                       max_connections=config.redis_max_connections)


async def create(config: QuotaConfig) -> GrpcService:
    client = make_redis(config)
    store = QuotaStore(
        client,
        key_prefix=config.key_prefix,
        lease_seconds=config.lease_seconds,
        settled_ttl_seconds=config.settled_ttl_seconds,
        usage_backlog_max=config.usage_backlog_max,
        demand_window_seconds=config.demand_window_seconds,
        reap_batch=config.reap_batch,
    )
    service = QuotaService(store, default_burst_seconds=config.default_burst_seconds)

    def register(server):
        quota_pb2_grpc.add_QuotaServiceServicer_to_server(QuotaServicer(service), server)
        return [SERVICE_NAME]

    svc = await start_grpc_service(config, register, policy=POLICY)
    reaper = asyncio.create_task(service.reap_forever(config.reap_interval_seconds))

    async def stop_reaper() -> None:
        await tasks.stop(reaper)

    svc.on_drain.append(stop_reaper)
    svc.on_stop.append(client.aclose)
    return svc


async def serve(config: QuotaConfig) -> None:
    setup_telemetry("quota")
    svc = await create(config)
    await svc.serve_until_signal()
