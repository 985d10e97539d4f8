"""Clients of the session's system, authenticated with its bootstrap admin token."""

from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture(scope="session")
def client(system):
    """The official OpenAI SDK, pointed at Envoy."""
    return openai.OpenAI(base_url=f"{system.base_url}/v1", api_key=system.admin_token, max_retries=0)


@pytest.fixture(scope="session")
def http(system):
    """A raw HTTP client through Envoy, for what the SDK does not send."""
    headers = {"authorization": f"Bearer {system.admin_token}"}
    with httpx.Client(base_url=system.base_url, timeout=120, headers=headers) as c:
        yield c


# The replicated system: two gateways (Envoy balancing least-request), two quota replicas and
# one Redis; the gateways (settlements) and the model servers (admissions) balance their quota
# calls round robin over both quota replicas. The same small embedding model is hosted under three names so traffic
# splits and fallbacks between "models" can be observed (x-fmapi-served-model says which one
# answered).
REPLICATED_MODELS = {"all-minilm-l6-v2": "package", "emb-a": "package", "emb-b": "package"}
REPLICATED_ENDPOINTS = """
endpoints:
  - name: all-minilm-l6-v2
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
  - name: x-requests
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits: {endpoint: {requests_per_minute: 40}}
  - name: x-input
    task: llm/v1/embeddings
    served_entities: [{model: all-minilm-l6-v2}]
    limits: {endpoint: {input_tokens_per_minute: 300}}
  - name: x-output
    task: llm/v1/chat
    served_entities: [{model: tiny}]
    limits: {endpoint: {output_tokens_per_minute: 240}, default_max_tokens: 12}
"""


@pytest.fixture(scope="session")
def replicated(tmp_path_factory, tiny_model):
    import json

    from fmapi_cli.system import GenerationSpec, System, SystemOptions
    from helpers.tiny_llm import TINY_ENGINE_ENV

    run_dir = tmp_path_factory.mktemp("replicated")
    (run_dir / "endpoints.yaml").write_text(REPLICATED_ENDPOINTS)
    s = System(SystemOptions(
        runtime_dir=run_dir, http_port=0, endpoints_file=run_dir / "endpoints.yaml",
        gateways=2, quotas=2,
        embedding_env={"FMAPI_EMBEDDING_MODELS": json.dumps(REPLICATED_MODELS)},
        generation=[GenerationSpec("tiny", tiny_model, TINY_ENGINE_ENV)],
    ))
    s.start()
    yield s
    s.stop()
