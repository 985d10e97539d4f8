"""Chat and completions end to end: the OpenAI SDK and a gRPC client through Envoy, against the
real vLLM engine serving a tiny random-weight model (gibberish text, real machinery)."""

from __future__ import annotations

import json
import time

import grpc
import jsonschema
import openai
import pytest

from fmapi.generation.v1 import generation_pb2, generation_pb2_grpc
from fmapi.inference.v1 import inference_pb2, inference_pb2_grpc
from helpers.tiny_llm import LONG_GENERATION

CHAT = "tiny-chat"
COMPLETIONS = "tiny-completions"
HELLO = [{"role": "user", "content": "hello there, how are you today"}]


def greedy(client, **kw):
    return client.chat.completions.create(model=CHAT, messages=HELLO, temperature=0, **kw)


def test_non_streaming_chat(client):
    out = greedy(client, max_tokens=8)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.model == CHAT
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streaming_chat_matches_non_streaming(client):
    whole = greedy(client, max_tokens=12).choices[0].message.content
    chunks = list(greedy(client, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole
    assert body[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.usage.completion_tokens > 0


def test_streamed_logprobs_cover_every_generated_token(client):
    """With logprobs, every token gets its entry in the stream, also one whose text is empty
    (part of a character still being decoded): the tiny model makes such tokens often."""
    chunks = list(greedy(client, max_tokens=200, stream=True, logprobs=True,
                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    entries = [lp for c in chunks if c.choices and c.choices[0].logprobs
               for lp in c.choices[0].logprobs.content]
    assert chunks[-1].usage.completion_tokens == 200
    assert len(entries) == 200
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(client, max_tokens=200, extra_body={"ignore_eos": True}).choices[0].message.content


def test_n_2_gives_two_choices(client):
    out = client.chat.completions.create(model=CHAT, messages=HELLO, n=2, max_tokens=6, seed=3)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.message.content for c in out.choices)


def test_max_tokens_gives_length_and_exact_count(client):
    out = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5


def test_stop_string_ends_the_text_before_it(client):
    full = greedy(client, max_tokens=24).choices[0].message.content
    assert len(full) > 6, full
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = greedy(client, max_tokens=24, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_same_seed_same_text(client):
    kw = dict(model=CHAT, messages=HELLO, max_tokens=12, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_json_schema_output_validates(client):
    # Bounded everywhere: a random-weight model would otherwise write digits until max_tokens.
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "ok": {"type": "boolean"},
                                               "size": {"enum": ["small", "large"]}},
              "required": ["name", "ok", "size"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=CHAT, messages=HELLO, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_tool_choice_required_gives_valid_arguments(client):
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
              "required": ["city"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    out = client.chat.completions.create(model=CHAT, messages=HELLO, tools=tools,
                                         tool_choice="required", max_tokens=60, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), params)


def test_completions_prompt_list_echo_and_stop(client):
    out = client.completions.create(model=COMPLETIONS, prompt=["the quick brown", "hello world"],
                                    max_tokens=4, temperature=0)
    assert sorted(c.index for c in out.choices) == [0, 1]
    echoed = client.completions.create(model=COMPLETIONS, prompt="the quick brown", max_tokens=4,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("the quick brown")
    assert echoed.choices[0].text.endswith(out.choices[0].text)
    streamed = client.completions.create(model=COMPLETIONS, prompt="the quick brown", max_tokens=4,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


def test_closing_a_stream_aborts_the_engine_request(system, client):
    stream = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=LONG_GENERATION, stream=True,
                                            extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    gateway = system.tls_files("gateway")
    creds = gateway.channel_credentials()
    with grpc.secure_channel(f"127.0.0.1:{system.ports['generation-tiny']}", creds,
                             options=[("grpc.ssl_target_name_override", "generation")]) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        deadline = time.monotonic() + 1.0
        while True:
            info = stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=5)
            if info.running_requests == 0:
                break
            assert time.monotonic() < deadline, f"{info.running_requests} requests still running"
            time.sleep(0.05)


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"model": CHAT, "messages": []}, 400, "messages"),
        ({"model": CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ({"model": CHAT, "messages": HELLO, "temperature": 5}, 400, "temperature"),
        ({"model": CHAT, "messages": HELLO, "max_tokens": 100000}, 400, "max_tokens"),
        ({"model": CHAT, "messages": [{"role": "user", "content": "hello " * 2500}]}, 400, "context"),
        ({"model": "no-such-model", "messages": HELLO}, 404, "no-such-model"),
        ({"model": CHAT, "messages": "hi"}, 400, "messages"),
        ({"model": CHAT, "messages": HELLO, "stream": "yes"}, 400, "stream"),
        ({"model": "all-minilm-l6-v2", "messages": HELLO}, 400, "embeddings"),
        ({"model": "tiny-chat-old", "messages": HELLO}, 400, "tiny-chat"),
    ],
)
def test_bad_chat_inputs_get_a_clear_4xx(http, body, status, fragment):
    for stream in (False, True):
        r = http.post("/v1/chat/completions", json={**body, "stream": stream} if "stream" not in body else body)
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert fragment in r.json()["error"]["message"], r.json()


def test_databricks_paths(system, http):
    r = http.post(f"/serving-endpoints/{CHAT}/invocations",
                  json={"messages": HELLO, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    db = openai.OpenAI(base_url=f"{system.base_url}/serving-endpoints", api_key=system.admin_token,
                       max_retries=0)
    out = db.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=4, temperature=0)
    assert out.choices[0].message.content == r.json()["choices"][0]["message"]["content"]
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert listed[CHAT]["task"] == "llm/v1/chat"


def test_grpc_streams_the_same_text_as_rest(system, client):
    rest = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=10, seed=7,
                                          temperature=0.8).choices[0].message.content
    with grpc.insecure_channel(f"127.0.0.1:{system.http_port}") as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        req = inference_pb2.ChatRequest(
            endpoint=CHAT, messages=[inference_pb2.Message(role="user", content=HELLO[0]["content"])],
            sampling=inference_pb2.Sampling(max_tokens=10, seed=7, temperature=0.8))
        parts = list(stub.Chat(req, metadata=(("authorization", f"Bearer {system.admin_token}"),),
                               timeout=60))
    assert "".join(d.text for p in parts for d in p.deltas) == rest
    assert parts[-1].usage.completion_tokens > 0
