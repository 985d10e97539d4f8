"""Shared fixtures: the whole system started once per session, the way `make run` starts it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fmapi_cli.dev import replicas
from fmapi_cli.system import GenerationSpec, System, SystemOptions
from helpers.otlp import OtlpCollector
from helpers.tiny_llm import TINY_ENGINE_ENV

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The e2e system: the dev embeddings endpoint plus chat/completions endpoints on a tiny model.
E2E_ENDPOINTS = """
endpoints:
  - name: all-minilm-l6-v2
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    embedding: {normalize: true, truncate: true}
  - name: tiny-chat
    task: llm/v1/chat
    served_entities: [{model: tiny}]
    limits: {default_max_tokens: 16}
  - name: tiny-completions
    task: llm/v1/completions
    served_entities: [{model: tiny}]
  - name: tiny-chat-old
    task: llm/v1/chat
    served_entities: [{model: tiny}]
    retired: true
    replacement: tiny-chat
# Metered endpoints for the quota tests (each test has its own, so their budgets are apart).
  - name: q-embed-ceiling
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits: {endpoint: {requests_per_minute: 30}}
  - name: q-embed-principals
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits:
      requests_per_minute: 2
      endpoint: {requests_per_minute: 5}
# Usage records and inference tables (tests/e2e/test_usage_e2e.py).
  - name: u-limited
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits: {endpoint: {requests_per_minute: 2}}
  - name: u-logged
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    ai_gateway: {inference_table: {enabled: true, sampling_fraction: 0.5}}
  - name: u-logged-chat
    task: llm/v1/chat
    served_entities: [{model: tiny}]
    limits: {default_max_tokens: 16}
    ai_gateway: {inference_table: {enabled: true, table_name_prefix: "chat log"}}
  - name: q-embed-override
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits:
      requests_per_minute: 1
      principals: [{principal: vip, limits: {requests_per_minute: 3}}]
  - name: q-embed-retry
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits: {input_tokens_per_minute: 600}
  - name: q-chat-tokens
    task: llm/v1/chat
    served_entities: [{model: tiny}]
    limits: {output_tokens_per_minute: 100, default_max_tokens: 16}
  - name: q-chat-stream
    task: llm/v1/chat
    served_entities: [{model: tiny}]
    limits: {output_tokens_per_minute: 100000}
# The public gRPC API's tests (tests/e2e/test_grpc_api_e2e.py).
  - name: g-metered
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits: {requests_per_minute: 10}
  - name: g-limited
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits: {requests_per_minute: 1, principals: [{principal: someone-else, limits: {requests_per_minute: 7}}]}
# Metrics that must add up (tests/e2e/test_observability_e2e.py): no other test uses these.
  - name: o-chat
    task: llm/v1/chat
    served_entities: [{model: tiny}]
  - name: o-embed
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
  - name: o-limited
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits: {endpoint: {requests_per_minute: 1}}
# The Node client's test (clients/node/test) reads a refusal's RetryInfo here.
  - name: n-limited
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits: {endpoint: {requests_per_minute: 1}}
  - name: q-provisioned
    task: llm/v1/chat
    served_entities: [{model: tiny}]
    capacity_mode: provisioned_throughput
    provisioned_throughput: {min_tokens_per_second: 5, max_tokens_per_second: 5,
                             chunk_tokens_per_second: 5}
"""



@pytest.fixture(scope="session")
def otlp():
    collector = OtlpCollector().start()
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from helpers.tiny_llm import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llm") / "tiny")


@pytest.fixture(scope="session")
def system(tmp_path_factory, otlp, tiny_model):
    """Redis, routing, embedding, generation (tiny model), gateway and Envoy on free ports,
    exporting spans to ``otlp`` (FMAPI_TEST_TRACES=off: exporting nothing, as a deployment
    without OTEL_EXPORTER_OTLP_ENDPOINT runs: no tracing interceptors on internal calls)."""
    run_dir = tmp_path_factory.mktemp("fmapi")
    endpoints = run_dir / "endpoints.yaml"
    endpoints.write_text(E2E_ENDPOINTS)
    sys_ = System(
        SystemOptions(
            runtime_dir=run_dir,
            http_port=0,
            endpoints_file=endpoints,
            generation=[GenerationSpec("tiny", tiny_model, TINY_ENGINE_ENV)],
            # FMAPI_TEST_REPLICAS="gateway=2,auth=2,..." runs the e2e tier on replicas.
            replicas=replicas(os.environ.get("FMAPI_TEST_REPLICAS", "")),
            env={
                **({} if os.environ.get("FMAPI_TEST_TRACES") == "off" else {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
                    "OTEL_EXPORTER_OTLP_INSECURE": "true",
                    "OTEL_BSP_SCHEDULE_DELAY": "100",
                }),
                # A killed usage writer's records are taken over quickly (the default is 30 s).
                "FMAPI_USAGE_CLAIM_IDLE_SECONDS": "2",
            },
        )
    )
    sys_.start()
    yield sys_
    sys_.stop()
