"""Wiring: config -> database (migrated), Redis, writer, gRPC server."""

from __future__ import annotations

import asyncio
import logging

from fmapi.usage.v1 import usage_pb2, usage_pb2_grpc
from fmapi_common import tasks
from fmapi_common.redis_client import make_redis
from fmapi_common.server import GrpcService, start_grpc_service
from fmapi_common.telemetry import setup_telemetry
from fmapi_common.tls import GATEWAY

from .config import UsageConfig
from .db import DatabaseUnavailable, UsageDB
from .servicer import UsageServicer
from .writer import UsageWriter

log = logging.getLogger(__name__)
SERVICE = usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name
# Only the gateway asks (for callers it has checked: admins, or a principal's own usage).
POLICY = {f"/{SERVICE}/": [GATEWAY]}


async def create(config: UsageConfig) -> GrpcService:
    db = UsageDB(config.database_url)
    delay = 0.5
    while True:  # the database may come up after us: wait, saying so
        try:
            await asyncio.to_thread(db.migrate)
            break
        except DatabaseUnavailable as exc:
            log.error("usage database unreachable (%s); retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    client = make_redis(config.redis_url, name="usage", timeout=config.redis_timeout_seconds,
                        max_connections=8, decode_responses=False)
    # XREADGROUP blocks on the server for up to block_ms: its connection must wait longer.
    reader = make_redis(config.redis_url, name="usage-writer",
                        timeout=config.redis_timeout_seconds + config.block_ms / 1000,
                        max_connections=2, decode_responses=False)

    def register(server):
        usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageServicer(db, client), server)
        return [SERVICE]

    svc = await start_grpc_service(config, register, policy=POLICY)
    loop = asyncio.get_running_loop()
    writer = UsageWriter(
        reader, db, key_prefix=config.key_prefix, group=config.consumer_group,
        consumer=config.consumer or None,
        batch_size=config.batch_size, block_ms=config.block_ms, linger_ms=config.linger_ms,
        claim_idle_seconds=config.claim_idle_seconds, backlog_alarm=config.backlog_alarm,
        entities_interval=config.entities_interval_seconds,
        on_health=lambda ok: loop.create_task(svc.set_serving(ok)))
    task = asyncio.create_task(writer.run())
    log.info("writing usage records as consumer %s of group %s", writer.consumer,
             config.consumer_group)

    async def stop_writer() -> None:
        await tasks.stop(task)

    svc.on_drain.append(stop_writer)
    svc.on_stop.extend([client.aclose, reader.aclose, lambda: asyncio.to_thread(db.close)])
    return svc


async def serve(config: UsageConfig) -> None:
    setup_telemetry("usage")
    svc = await create(config)
    await svc.serve_until_signal()
