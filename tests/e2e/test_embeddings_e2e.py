"""Embeddings end to end: OpenAI SDK and gRPC clients through Envoy, the way users call fmapi."""

from __future__ import annotations

import base64
import secrets

import grpc
import numpy as np
import openai
import pytest

from fmapi.inference.v1 import inference_pb2, inference_pb2_grpc

MODEL = "all-minilm-l6-v2"


def grpc_auth(system):
    return (("authorization", f"Bearer {system.admin_token}"),)


def cos(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_default_base64_and_float_give_the_same_384_dim_vectors(client, http):
    text = "The quick brown fox jumps over the lazy dog."
    default = client.embeddings.create(model=MODEL, input=text)  # the SDK asks for base64
    floats = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
    assert len(default.data[0].embedding) == 384
    assert np.allclose(default.data[0].embedding, floats.data[0].embedding, atol=1e-6)
    assert default.usage.prompt_tokens == floats.usage.prompt_tokens > 0
    assert default.usage.total_tokens == default.usage.prompt_tokens
    assert default.model == MODEL
    # The wire format really is base64 of little-endian float32 when asked for.
    raw = http.post("/v1/embeddings", json={"model": MODEL, "input": text, "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, floats.data[0].embedding, atol=1e-6)
    # Normalized by the endpoint's settings.
    assert abs(np.linalg.norm(vec) - 1) < 1e-4


def test_similar_sentences_score_higher_than_unrelated(client):
    out = client.embeddings.create(
        model=MODEL,
        input=[
            "A cat is sitting on the mat.",
            "A kitten rests on a rug.",
            "Quarterly revenue grew by five percent.",
        ],
    )
    cat, kitten, revenue = (d.embedding for d in out.data)
    assert cos(cat, kitten) > cos(cat, revenue) + 0.2


def test_batch_returns_vectors_in_input_order(client):
    texts = [f"sentence number {i} about {w}" for i, w in enumerate(
        ["apples", "rockets", "violins", "glaciers", "taxes", "spiders", "poetry", "databases"])]
    batch = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in batch.data] == list(range(len(texts)))
    for text, d in zip(texts, batch.data):
        single = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
        assert cos(single.data[0].embedding, d.embedding) > 0.9999


def test_token_inputs(client):
    from_text = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    # all-MiniLM's own tokenizer ids for "hello world".
    from_ids = client.embeddings.create(model=MODEL, input=[[7592, 2088]], encoding_format="float")
    assert cos(from_text.data[0].embedding, from_ids.data[0].embedding) > 0.9999


def test_databricks_paths_return_the_same_vectors(system, client, http):
    text = "Databricks clients call invocations."
    ref = client.embeddings.create(model=MODEL, input=text, encoding_format="float").data[0].embedding
    inv = http.post(f"/serving-endpoints/{MODEL}/invocations", json={"input": [text]})
    assert inv.status_code == 200, inv.text
    assert np.allclose(inv.json()["data"][0]["embedding"], ref, atol=1e-6)
    # An OpenAI client pointed at <host>/serving-endpoints.
    db = openai.OpenAI(base_url=f"{system.base_url}/serving-endpoints", api_key=system.admin_token,
                       max_retries=0)
    got = db.embeddings.create(model=MODEL, input=text)
    assert np.allclose(got.data[0].embedding, ref, atol=1e-6)


def test_control_plane_describes_endpoints(http, client):
    listed = http.get("/api/2.0/serving-endpoints").json()["endpoints"]
    ep = next(e for e in listed if e["name"] == MODEL)
    assert ep["task"] == "llm/v1/embeddings"
    assert ep["state"]["ready"] == "READY"
    one = http.get(f"/api/2.0/serving-endpoints/{MODEL}").json()
    assert one["config"]["served_entities"][0]["entity_name"] == MODEL
    assert http.get("/api/2.0/serving-endpoints/nope").status_code == 404
    assert MODEL in [m.id for m in client.models.list()]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_grpc_client_through_envoy_gets_the_same_vectors(system, client):
    texts = ["gRPC through Envoy", "same listener as REST"]
    ref = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    with grpc.insecure_channel(f"127.0.0.1:{system.http_port}") as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        md = grpc_auth(system)
        out = stub.Embed(inference_pb2.EmbedRequest(endpoint=MODEL, texts=texts), timeout=30,
                         metadata=md)
        assert out.usage.prompt_tokens == ref.usage.prompt_tokens
        for got, want in zip(out.embeddings, ref.data):
            assert np.allclose(got.values, want.embedding, atol=1e-6)
        models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10, metadata=md)
        assert any(m.id == MODEL and m.ready for m in models.models)
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(inference_pb2.EmbedRequest(endpoint="nope", texts=["x"]), timeout=10,
                       metadata=md)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(inference_pb2.EmbedRequest(endpoint=MODEL, texts=[]), timeout=10,
                       metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_reflection_through_envoy(system):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{system.http_port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(iter(stub.ServerReflectionInfo(iter([req]), timeout=10,
                                                   metadata=grpc_auth(system))))
        names = [s.name for s in resp.list_services_response.service]
        assert "fmapi.inference.v1.InferenceService" in names


def test_one_trace_spans_gateway_quota_and_embedding_without_routing(system, otlp, http):
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    r = http.post(
        "/v1/embeddings",
        json={"model": MODEL, "input": "trace me"},
        headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    assert r.status_code == 200

    assert r.headers["x-fmapi-trace-id"] == trace_id

    def complete(spans):
        services = {s.service for s in spans if s.kind == 2}  # SERVER spans
        return {"envoy", "gateway", "quota", "embedding"} <= services

    spans = otlp.trace(trace_id, complete)
    assert complete(spans), spans
    # The gateway resolved the endpoint from its own copy of the registry: no routing hop.
    assert "routing" not in {s.service for s in spans}
    by_id = {s.span_id: s for s in spans}
    envoy = next(s for s in spans if s.service == "envoy" and s.kind == 2)
    assert envoy.parent_id == parent  # continues the caller's trace
    gw = next(s for s in spans if s.service == "gateway" and s.kind == 2)
    assert gw.parent_id == envoy.span_id
    assert gw.attributes["gen_ai.operation.name"] == "embeddings"
    assert gw.attributes["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"]
    # embedding's server span <- gateway's client span <- gateway's request span; the
    # embedding server admits the request itself (it counts its tokens):
    # quota's server span <- embedding's client span <- embedding's server span
    embedding = next(s for s in spans if s.service == "embedding" and s.kind == 2
                     and "Embed" in s.name)
    quota = next(s for s in spans if s.service == "quota" and s.kind == 2 and "Admit" in s.name)
    for server, caller, parent in ((embedding, "gateway", gw), (quota, "embedding", embedding)):
        client_span = by_id[server.parent_id]
        assert client_span.service == caller and client_span.kind == 3
        assert client_span.parent_id == parent.span_id
    # No CountTokens call: the tokens were counted where they were embedded.
    assert not [s for s in spans if "CountTokens" in s.name]


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"", 400, "empty"),
        (b'{"input": "x"}', 400, "'model' is required"),
        (b'{"model": 7, "input": "x"}', 400, "'model' is required"),
        (b'{"model": "all-minilm-l6-v2"}', 400, "'input' is required"),
        (b'{"model": "all-minilm-l6-v2", "input": 5}', 400, "'input' must be"),
        (b'{"model": "all-minilm-l6-v2", "input": []}', 400, "must not be empty"),
        (b'{"model": "all-minilm-l6-v2", "input": ""}', 400, "input[0] is empty"),
        (b'{"model": "all-minilm-l6-v2", "input": ["a", 1]}', 400, "'input' must be"),
        (b'{"model": "all-minilm-l6-v2", "input": [[999999]]}', 400, "outside the model's vocabulary"),
        (b'{"model": "all-minilm-l6-v2", "input": "x", "encoding_format": "xml"}', 400, "encoding_format"),
        (b'{"model": "all-minilm-l6-v2", "input": "x", "dimensions": 64}', 400, "does not support the 'dimensions'"),
        (b'{"model": "all-minilm-l6-v2", "input": "x", "dimensions": -1}', 400, "positive integer"),
        (b'{"model": "no-such-endpoint", "input": "x"}', 404, "no-such-endpoint"),
    ],
)
def test_bad_inputs_get_a_clear_4xx(http, body, status, fragment):
    r = http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert fragment in err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error_code"] in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")
    assert r.headers["x-request-id"]


def test_body_over_4_mib_gets_413_and_the_service_keeps_serving(http, client):
    big = b'{"model": "all-minilm-l6-v2", "input": "' + b"a" * (4 * 1024 * 1024 + 10) + b'"}'
    r = http.post("/v1/embeddings", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "limit" in r.json()["error"]["message"]
    assert client.embeddings.create(model=MODEL, input="still alive").data


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MODEL, input=[])
    assert "must not be empty" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="missing", input="x")


def test_every_response_has_a_request_id(http):
    for r in (
        http.get("/v1/models"),
        http.get("/healthz"),
        http.get("/no/such/path"),
        http.post("/v1/embeddings", content=b"{"),
    ):
        assert r.headers.get("x-request-id"), (r.request.url, r.headers)
    assert http.get("/no/such/path").status_code == 404
    assert http.get("/v1/embeddings").status_code == 405
