"""Usage records in PostgreSQL (a throwaway cluster this module starts), on a system of its
own: one row per request with what its client was told, and a database that goes away for 30 s
under load loses nothing — requests keep being served and metered, records wait in Redis, and
arrive when it is back."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fmapi_cli.system import GenerationSpec, System, SystemOptions
from fmapi_common.channels import make_channel
from fmapi_common.tls import USAGE
from helpers.postgres import PostgresServer
from helpers.tiny_llm import TINY_ENGINE_ENV
from helpers.usage import check_mixed, wait_rows

ENDPOINTS = """
endpoints:
  - name: all-minilm-l6-v2
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
  - name: tiny-chat
    task: llm/v1/chat
    served_entities: [{model: tiny}]
  - name: tiny-completions
    task: llm/v1/completions
    served_entities: [{model: tiny}]
  - name: u-limited
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits: {endpoint: {requests_per_minute: 2}}
"""
OUTAGE_SECONDS = 30


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    server = PostgresServer(tmp_path_factory.mktemp("pg")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pg_system(tmp_path_factory, tiny_model, pg):
    run_dir = tmp_path_factory.mktemp("usage-pg")
    (run_dir / "endpoints.yaml").write_text(ENDPOINTS)
    s = System(SystemOptions(
        runtime_dir=run_dir, http_port=0, endpoints_file=run_dir / "endpoints.yaml",
        generation=[GenerationSpec("tiny", tiny_model, TINY_ENGINE_ENV)],
        usage_database_url=pg.url,
    ))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def pg_http(pg_system):
    with httpx.Client(base_url=pg_system.base_url, timeout=120,
                      headers={"authorization": f"Bearer {pg_system.admin_token}"}) as c:
        yield c


def test_every_request_leaves_one_row_in_postgres(pg_http, pg):
    check_mixed(pg_http, pg.url)


def _usage_health(system) -> str:
    async def check():
        ch = make_channel(f"127.0.0.1:{system.ports['usage']}", system.tls_files("gateway"), USAGE)
        try:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=5)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        finally:
            await ch.close()
    return asyncio.run(check())


def test_a_database_outage_under_load_loses_nothing(pg_system, pg_http, pg):
    tag = f"outage-{uuid.uuid4().hex[:8]}"
    statuses: list[int] = []
    stop = threading.Event()

    def load():
        i = 0
        with httpx.Client(base_url=pg_system.base_url, timeout=60, headers={
                "authorization": f"Bearer {pg_system.admin_token}"}) as c:
            while not stop.is_set():
                statuses.append(c.post("/v1/embeddings", json={
                    "model": "all-minilm-l6-v2", "input": f"during the outage {i}",
                    "client_request_id": f"{tag}-{i}"}).status_code)
                i += 1
                time.sleep(0.1)

    assert _usage_health(pg_system) == "SERVING"
    t = threading.Thread(target=load)
    t.start()
    time.sleep(1)
    pg.stop()
    try:
        time.sleep(OUTAGE_SECONDS / 2)
        assert _usage_health(pg_system) == "NOT_SERVING"  # the writer says it cannot write
        time.sleep(OUTAGE_SECONDS / 2)
    finally:
        pg.start()
    time.sleep(1)
    stop.set()
    t.join(60)
    assert len(statuses) > 50 and set(statuses) == {200}
    found = wait_rows(pg.url, tag, len(statuses), timeout=60)
    ids = {r["client_request_id"] for r in found}
    assert ids == {f"{tag}-{i}" for i in range(len(statuses))}
    deadline = time.monotonic() + 20
    while _usage_health(pg_system) != "SERVING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _usage_health(pg_system) == "SERVING"
    log = pg_system.child("usage").log_path.read_text()
    assert "usage database unreachable" in log and "waiting in Redis" in log
