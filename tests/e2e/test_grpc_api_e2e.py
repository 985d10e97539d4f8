"""The public gRPC API at parity with REST, through Envoy, against the real engine (tiny model).

Parity: the same request sent as REST SSE and as a gRPC Chat stream gives the same text, tool
calls, logprobs, finish reasons and usage. Refusals: the inputs the REST tests refuse are refused
over gRPC too, INVALID_ARGUMENT with a BadRequest naming the gRPC field and REST's message.
"""

from __future__ import annotations

import json
import struct
import time
import uuid

import grpc
import pytest
from grpc_status import rpc_status

from fmapi.inference.v1 import inference_pb2 as pb
from fmapi.inference.v1 import inference_pb2_grpc
from helpers.engine import running_requests, wait_for
from helpers.rich_status import details as status_details
from helpers.tiny_llm import LONG_GENERATION
from helpers.usage import records

CHAT = "tiny-chat"
COMPLETIONS = "tiny-completions"
EMBED = "all-minilm-l6-v2"
HELLO = "hello there, how are you today"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                   "required": ["city"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def stub(system):
    with grpc.insecure_channel(f"127.0.0.1:{system.http_port}") as ch:
        yield inference_pb2_grpc.InferenceServiceStub(ch)


@pytest.fixture(scope="module")
def md(system):
    return (("authorization", f"Bearer {system.admin_token}"),)


def details(err: grpc.RpcError) -> dict:
    st = rpc_status.from_call(err)
    assert st is not None, f"no google.rpc.Status on {err.code()}: {err.details()}"
    return status_details(st)


# ---------------------------------------------------------------- parity with REST SSE


def rest_stream(http, body: dict) -> dict:
    """A REST SSE chat stream, gathered per choice."""
    out: dict = {"text": {}, "calls": {}, "logprobs": {}, "finish": {}, "usage": None}
    with http.stream("POST", "/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                u = chunk["usage"]
                out["usage"] = (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])
            for c in chunk["choices"]:
                i = c["index"]
                out["text"][i] = out["text"].get(i, "") + (c["delta"].get("content") or "")
                for call in c["delta"].get("tool_calls") or ():
                    out["calls"].setdefault(i, []).append(
                        (call["function"]["name"], call["function"]["arguments"]))
                for t in (c.get("logprobs") or {}).get("content") or ():
                    out["logprobs"].setdefault(i, []).append(
                        (t["token"], t["logprob"], [(a["token"], a["logprob"]) for a in t["top_logprobs"]]))
                if c["finish_reason"]:
                    out["finish"][i] = c["finish_reason"]
    return out


def grpc_stream(stub, md, request: pb.ChatRequest) -> dict:
    out: dict = {"text": {}, "calls": {}, "logprobs": {}, "finish": {}, "usage": None}
    for resp in stub.Chat(request, metadata=md, timeout=60):
        if resp.HasField("usage"):
            u = resp.usage
            out["usage"] = (u.prompt_tokens, u.completion_tokens, u.total_tokens)
        for d in resp.deltas:
            i = d.index
            out["text"][i] = out["text"].get(i, "") + d.text
            for call in d.tool_calls:
                out["calls"].setdefault(i, []).append((call.function.name, call.function.arguments))
            for t in d.logprobs:
                assert t.token_bytes == t.token.encode()
                out["logprobs"].setdefault(i, []).append(
                    (t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]))
            if d.finish_reason:
                out["finish"][i] = d.finish_reason
    return out


def same(rest: dict, grpc_: dict) -> None:
    assert grpc_["usage"] == rest["usage"]
    assert grpc_["finish"] == rest["finish"]
    assert grpc_["calls"] == rest["calls"]
    assert {i: t for i, t in grpc_["text"].items() if t} == {i: t for i, t in rest["text"].items() if t}
    assert grpc_["logprobs"].keys() == rest["logprobs"].keys()
    for i, tokens in rest["logprobs"].items():
        assert len(grpc_["logprobs"][i]) == len(tokens)
        for (tok, lp, top), (gtok, glp, gtop) in zip(tokens, grpc_["logprobs"][i]):
            assert gtok == tok and glp == pytest.approx(lp, rel=1e-6, abs=1e-6)
            assert [a for a, _ in gtop] == [a for a, _ in top]


def _user(text: str = HELLO) -> pb.Message:
    return pb.Message(role="user", content=text)


PARITY = {
    "tools-required": (
        {"tools": [WEATHER], "tool_choice": "required", "max_tokens": 60, "temperature": 0},
        {"tools": [pb.Tool(type="function", function=pb.FunctionDefinition(
            name="get_weather", description="the weather in a city",
            parameters_json=json.dumps(WEATHER["function"]["parameters"])))],
         "tool_choice": pb.ToolChoice(mode="required"),
         "sampling": pb.Sampling(max_tokens=60, temperature=0)}),
    "json-schema": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
         "max_tokens": 48, "seed": 5},
        {"sampling": pb.Sampling(max_tokens=48, seed=5, response_format=pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            json_schema=pb.JsonSchema(name="s", schema_json=json.dumps(SCHEMA)))),
         }),
    "logprobs": (
        {"logprobs": True, "top_logprobs": 3, "max_tokens": 8, "seed": 9},
        {"sampling": pb.Sampling(max_tokens=8, seed=9, logprobs=True, top_logprobs=3)}),
    "n-2": (
        {"n": 2, "max_tokens": 8, "seed": 11, "temperature": 0.9},
        {"sampling": pb.Sampling(max_tokens=8, seed=11, temperature=0.9, n=2)}),
    "stop": (
        {"stop": ["e", "o"], "max_tokens": 24, "seed": 13},
        {"sampling": pb.Sampling(max_tokens=24, seed=13, stop=["e", "o"])}),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_grpc_chat_stream_is_the_rest_stream(http, stub, md, case):
    rest_body, grpc_fields = PARITY[case]
    rest = rest_stream(http, {"model": CHAT, "messages": [{"role": "user", "content": HELLO}],
                              **rest_body})
    got = grpc_stream(stub, md, pb.ChatRequest(endpoint=CHAT, messages=[_user()], **grpc_fields))
    same(rest, got)
    if case == "tools-required":
        [(name, arguments)] = got["calls"][0]
        assert name == "get_weather" and isinstance(json.loads(arguments)["city"], str)
        assert got["finish"] == {0: "tool_calls"}
    if case == "json-schema":
        assert got["text"][0].lstrip().startswith("{")
    if case == "logprobs":
        assert len(got["logprobs"][0]) == 8 and all(len(top) == 3 for _, _, top in got["logprobs"][0])
    if case == "n-2":
        assert set(got["finish"]) == {0, 1}


def test_an_assistant_turn_with_tool_calls_and_the_tool_answer_are_accepted(stub, md):
    messages = [
        _user("weather in Paris?"),
        pb.Message(role="assistant", tool_calls=[pb.ToolCall(
            id="call_1", type="function",
            function=pb.FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))]),
        pb.Message(role="tool", tool_call_id="call_1", content="sunny, 21 C"),
    ]
    got = grpc_stream(stub, md, pb.ChatRequest(
        endpoint=CHAT, messages=messages, sampling=pb.Sampling(max_tokens=4),
        tool_choice=pb.ToolChoice(mode="none"),
        tools=[pb.Tool(function=pb.FunctionDefinition(
            name="get_weather", parameters_json=json.dumps(WEATHER["function"]["parameters"])))]))
    assert got["usage"][0] > 0 and got["finish"][0] in ("stop", "length")


def test_completions_echo_and_logprobs_match_rest(http, stub, md):
    r = http.post("/v1/completions", json={"model": COMPLETIONS, "prompt": "the quick", "echo": True,
                                           "logprobs": 2, "max_tokens": 6, "seed": 1})
    assert r.status_code == 200, r.text
    rest = r.json()["choices"][0]
    parts = list(stub.Complete(pb.CompleteRequest(
        endpoint=COMPLETIONS, prompt="the quick", echo=True, logprobs=2,
        sampling=pb.Sampling(max_tokens=6, seed=1)), metadata=md, timeout=60))
    text = "".join(d.text for p in parts for d in p.deltas)
    assert text == rest["text"] and text.startswith("the quick")
    tokens = [t.token for p in parts for d in p.deltas for t in d.logprobs]
    assert tokens == [t for t in rest["logprobs"]["tokens"] if t is not None][-len(tokens):]
    assert parts[-1].usage.completion_tokens == r.json()["usage"]["completion_tokens"]


# ---------------------------------------------------------------- refusals


def chat(**kw) -> pb.ChatRequest:
    return pb.ChatRequest(endpoint=kw.pop("endpoint", CHAT), messages=kw.pop("messages", [_user()]), **kw)


# (gRPC request, the field its BadRequest names, the REST body that is the same mistake or None)
BAD = {
    "no-messages": ("Chat", chat(messages=[]), "messages", {"messages": []}),
    "bad-role": ("Chat", chat(messages=[pb.Message(role="wizard", content="hi")]), "messages[0].role",
                 {"messages": [{"role": "wizard", "content": "hi"}]}),
    "temperature": ("Chat", chat(sampling=pb.Sampling(temperature=5)), "sampling.temperature",
                    {"temperature": 5}),
    "max-tokens": ("Chat", chat(sampling=pb.Sampling(max_tokens=100000)), "sampling.max_tokens",
                   {"max_tokens": 100000}),
    "too-long": ("Chat", chat(messages=[_user("hello " * 2500)]), "messages",
                 {"messages": [{"role": "user", "content": "hello " * 2500}]}),
    "top-logprobs-alone": ("Chat", chat(sampling=pb.Sampling(top_logprobs=2)),
                           "sampling.top_logprobs", {"top_logprobs": 2}),
    "top-logprobs-range": ("Chat", chat(sampling=pb.Sampling(logprobs=True, top_logprobs=50)),
                           "sampling.top_logprobs", {"logprobs": True, "top_logprobs": 50}),
    "best-of": ("Chat", chat(sampling=pb.Sampling(best_of=3)), "sampling.best_of", {"best_of": 3}),
    "logit-bias": ("Chat", chat(sampling=pb.Sampling(logit_bias={5: 500})), "sampling.logit_bias",
                   {"logit_bias": {"5": 500}}),
    "unknown-tool": ("Chat", chat(tools=[pb.Tool(function=pb.FunctionDefinition(name="f"))],
                                  tool_choice=pb.ToolChoice(function_name="g")), "tool_choice",
                     {"tools": [{"type": "function", "function": {"name": "f"}}],
                      "tool_choice": {"type": "function", "function": {"name": "g"}}}),
    "user": ("Chat", chat(user="u" * 300), "user", {"user": "u" * 300}),
    "no-endpoint": ("Chat", chat(endpoint=""), "endpoint", {"model": ""}),
    "parameters-json": ("Chat", chat(tools=[pb.Tool(function=pb.FunctionDefinition(
        name="f", parameters_json="{not json"))]), "tools[0].function.parameters_json", None),
    "schema-json": ("Chat", chat(sampling=pb.Sampling(response_format=pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=pb.JsonSchema(name="s", schema_json="[")))),
        "sampling.response_format.json_schema.schema_json", None),
    "suffix": ("Complete", pb.CompleteRequest(endpoint=COMPLETIONS, prompt="a", suffix="b"), "suffix",
               {"suffix": "b"}),
    "completion-logprobs": ("Complete", pb.CompleteRequest(endpoint=COMPLETIONS, prompt="a", logprobs=50),
                            "logprobs", {"logprobs": 50}),
    "no-texts": ("Embed", pb.EmbedRequest(endpoint=EMBED), "texts", {"input": []}),
    "dimensions": ("Embed", pb.EmbedRequest(endpoint=EMBED, texts=["a"], dimensions=7), "dimensions",
                   {"dimensions": 7}),
}
_REST = {"Chat": ("/v1/chat/completions", CHAT, {"messages": [{"role": "user", "content": HELLO}]}),
         "Complete": ("/v1/completions", COMPLETIONS, {"prompt": "a"}),
         "Embed": ("/v1/embeddings", EMBED, {"input": ["a"]})}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_invalid_argument_naming_the_field_with_rests_message(http, stub, md, case):
    method, request, field, rest_body = BAD[case]
    call = getattr(stub, method)
    with pytest.raises(grpc.RpcError) as err:
        out = call(request, metadata=md, timeout=30)
        if method != "Embed":
            list(out)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    found = details(err.value)
    [violation] = found["BadRequest"].field_violations
    assert violation.field == field
    info = found["ErrorInfo"]
    assert (info.reason, info.domain, info.metadata["param"]) == ("INVALID_PARAMETER_VALUE", "fmapi", field)
    assert violation.description == err.value.details()
    if rest_body is None:
        assert field in err.value.details()
        return
    path, model, base = _REST[method]
    r = http.post(path, json={"model": model, **base, **rest_body})
    assert r.status_code == 400, r.text
    # REST's message, naming the gRPC field where it quotes the parameter.
    param = r.json()["error"]["param"]
    head = param[:min((i for i in (param.find("."), param.find("[")) if i >= 0), default=len(param))]
    assert field.endswith(param[len(head):])
    grpc_head = field[:len(field) - len(param) + len(head)]
    message = r.json()["error"]["message"].replace(f"'{head}'", f"'{grpc_head}'")
    assert err.value.details() == message


def test_an_unknown_endpoint_is_not_found_naming_the_endpoint_field(stub, md):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Chat(chat(endpoint="no-such-endpoint"), metadata=md, timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    found = details(err.value)
    assert found["ErrorInfo"].reason == "RESOURCE_DOES_NOT_EXIST"
    assert found["BadRequest"].field_violations[0].field == "endpoint"
    assert "no-such-endpoint" in err.value.details()


# ---------------------------------------------------------------- quota and models


def test_remaining_quota_is_in_the_metadata_as_in_the_rest_headers(http, stub, md):
    _, call = stub.Embed.with_call(pb.EmbedRequest(endpoint="g-metered", texts=["a"]), metadata=md,
                                   timeout=30)
    meta = dict(call.initial_metadata())
    assert meta["x-ratelimit-limit-requests"] == "10"
    assert meta["x-ratelimit-remaining-requests"] == "9"
    r = http.post("/v1/embeddings", json={"model": "g-metered", "input": "a"})
    assert r.headers["x-ratelimit-limit-requests"] == "10"
    assert r.headers["x-ratelimit-remaining-requests"] == "8"
    assert set(h for h in r.headers if h.startswith("x-ratelimit-")) == \
        set(k for k in meta if k.startswith("x-ratelimit-"))


def test_a_rate_limited_call_says_why_and_when_to_retry(stub, md):
    stub.Embed(pb.EmbedRequest(endpoint="g-limited", texts=["a"]), metadata=md, timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.EmbedRequest(endpoint="g-limited", texts=["a"]), metadata=md, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(err.value)
    assert found["ErrorInfo"].reason == "REQUEST_LIMIT_EXCEEDED"
    delay = found["RetryInfo"].retry_delay
    assert 0 < delay.seconds + delay.nanos / 1e9 <= 60


def test_models_carry_task_state_and_the_callers_limits(stub, md):
    listed = {m.id: m for m in stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=30).models}
    assert listed[CHAT].task == "llm/v1/chat" and listed[CHAT].ready
    assert listed[EMBED].task == "llm/v1/embeddings"
    assert "tiny-chat-old" not in listed  # retired
    assert listed["q-provisioned"].capacity_mode == pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT
    assert listed[CHAT].capacity_mode == pb.CAPACITY_MODE_PAY_PER_TOKEN
    assert listed[CHAT].default_max_tokens == 16
    model = stub.GetModel(pb.GetModelRequest(endpoint="g-limited"), metadata=md, timeout=30).model
    assert model.config_update == pb.CONFIG_UPDATE_NOT_UPDATING and model.ready
    limits = {(r.key, r.principal): r for r in model.rate_limits}
    assert limits[("user", "")].calls == 1 and limits[("user", "")].renewal_period == "minute"
    # The admin sees every principal's override.
    assert limits[("user", "someone-else")].calls == 7
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(pb.GetModelRequest(endpoint="nope"), metadata=md, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(err.value)["BadRequest"].field_violations[0].field == "endpoint"


def test_a_caller_sees_only_its_own_override(system, http, stub):
    r = http.post("/api/2.0/token/create", json={"comment": "grpc-limits", "endpoints": ["g-*"],
                                                  "lifetime_seconds": 600})
    assert r.status_code == 200, r.text
    token = r.json()["token_value"]
    md = (("authorization", f"Bearer {token}"),)
    model = stub.GetModel(pb.GetModelRequest(endpoint="g-limited"), metadata=md, timeout=30).model
    assert [(r.key, r.principal) for r in model.rate_limits] == [("user", ""), ("service_principal", "")]
    listed = [m.id for m in stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=30).models]
    assert sorted(listed) == ["g-limited", "g-metered"]
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(pb.GetModelRequest(endpoint=CHAT), metadata=md, timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and err.value.details()


def test_embeddings_as_raw_little_endian_bytes_are_the_floats(stub, md):
    req = pb.EmbedRequest(endpoint=EMBED, texts=["a cat", "a dog"])
    floats = stub.Embed(req, metadata=md, timeout=30)
    req.encoding = pb.EMBEDDING_ENCODING_BYTES
    raw = stub.Embed(req, metadata=md, timeout=30)
    assert len(raw.embeddings) == 2
    for f, b in zip(floats.embeddings, raw.embeddings):
        assert not b.values and len(b.raw) == 4 * len(f.values) == 4 * 384
        assert struct.unpack(f"<{len(f.values)}f", b.raw) == pytest.approx(list(f.values), abs=1e-6)


# ---------------------------------------------------------------- cancellation and deadlines


def _usage_row(system, endpoint: str, crid: str, within: float = 10) -> dict:
    deadline = time.monotonic() + within
    while True:
        mine = [r for r in records(system, endpoint) if r["client_request_id"] == crid]
        if mine:
            return mine[0]
        assert time.monotonic() < deadline, f"no usage record for {crid}"
        time.sleep(0.1)


def _long(crid: str) -> pb.ChatRequest:
    return chat(sampling=pb.Sampling(max_tokens=LONG_GENERATION, ignore_eos=True), client_request_id=crid)


def test_a_client_deadline_ends_the_stream_aborts_the_engine_and_settles_what_was_generated(
        system, stub, md):
    crid = f"deadline-{uuid.uuid4().hex[:8]}"
    got = 0
    with pytest.raises(grpc.RpcError) as err:
        # Long enough for the first tokens on a busy machine (the replicas pass once got none
        # within 1 s), far shorter than the whole generation.
        for resp in stub.Chat(_long(crid), metadata=md, timeout=1.5):
            got += len(resp.deltas)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert got > 0, "the deadline should leave time for some tokens"
    wait_for(lambda: running_requests(system) == 0, 2.0, "the engine kept generating after the deadline")
    row = _usage_row(system, CHAT, crid)
    assert row["status_code"] == "504"
    assert got <= int(row["output_tokens"]) < LONG_GENERATION


def test_a_cancelled_stream_aborts_the_engine_and_is_settled_as_client_closed(system, stub, md):
    crid = f"cancel-{uuid.uuid4().hex[:8]}"
    call = stub.Chat(_long(crid), metadata=md, timeout=60)
    next(call)
    call.cancel()
    wait_for(lambda: running_requests(system) == 0, 2.0, "the engine kept generating after the cancel")
    row = _usage_row(system, CHAT, crid)
    assert row["status_code"] == "499" and 0 < int(row["output_tokens"]) < LONG_GENERATION


def test_health_check_needs_no_token_and_health_watch_needs_one(system, md):
    """Check answers anyone; Watch (a stream that may stay open for a day without a byte) is not
    open to anyone: a flood of them would hold the gateway's memory."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{system.http_port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
        with pytest.raises(grpc.RpcError) as err:
            next(health.Watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        watch = health.Watch(health_pb2.HealthCheckRequest(), metadata=md, timeout=10)
        try:
            assert next(watch).status == serving
        finally:
            watch.cancel()
