"""The public gRPC API's requests as the REST bodies they stand for, and REST's field names as
the gRPC request's (no servers: the e2e tests send both through Envoy)."""

from __future__ import annotations

import json

import pytest

from fmapi.inference.v1 import inference_pb2 as pb
from fmapi.routing.v1 import routing_pb2
from fmapi_common.errors import InvalidArgument
from fmapi_common.identity import Identity
from fmapi_gateway import grpc_api
from fmapi_gateway.openai_generation import parse_chat, parse_completion

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 1}}}


def test_a_full_chat_request_is_the_rest_body_it_stands_for():
    req = pb.ChatRequest(
        endpoint="chat", user="u1", client_request_id="c1", usage_context={"team": "x"},
        messages=[
            pb.Message(role="system", content="be brief", name="sys"),
            pb.Message(role="assistant", tool_calls=[pb.ToolCall(
                id="call_1", function=pb.FunctionCall(name="f", arguments='{"a": 1}'))]),
            pb.Message(role="tool", tool_call_id="call_1", content="42"),
        ],
        sampling=pb.Sampling(
            max_tokens=9, temperature=0.5, top_p=0.9, top_k=4, stop=["x"], n=2, seed=7,
            presence_penalty=0.5, logprobs=True, top_logprobs=2, logit_bias={3: -100.0},
            ignore_eos=True, best_of=2,
            response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                                              json_schema=pb.JsonSchema(name="s", schema_json=json.dumps(SCHEMA),
                                                                        strict=True))),
        tools=[pb.Tool(function=pb.FunctionDefinition(name="f", description="d",
                                                      parameters_json=json.dumps(SCHEMA)))],
        tool_choice=pb.ToolChoice(function_name="f"),
    )
    body = grpc_api.chat_body(req)
    assert body == {
        "model": "chat", "user": "u1", "client_request_id": "c1", "usage_context": {"team": "x"},
        "stream": True, "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": "be brief", "name": "sys"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ],
        "max_tokens": 9, "temperature": 0.5, "top_p": pytest.approx(0.9), "top_k": 4, "stop": ["x"],
        "n": 2, "seed": 7, "presence_penalty": 0.5, "logprobs": True, "top_logprobs": 2,
        "logit_bias": {"3": -100.0}, "ignore_eos": True, "best_of": 2,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}},
        "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": SCHEMA}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
    }
    call = parse_chat(body, None)  # and the REST parser takes it
    assert call.n == 2 and call.logprobs and call.stream and call.include_usage
    assert json.loads(call.requests[0].sampling.json_schema) == SCHEMA  # integers stay integers


def test_unset_fields_stay_out_of_the_body():
    body = grpc_api.chat_body(pb.ChatRequest(endpoint="c", messages=[pb.Message(role="user", content="hi")]))
    assert body == {"model": "c", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                    "stream_options": {"include_usage": True}}
    # temperature 0 set explicitly is greedy decoding, not "unset"
    body = grpc_api.chat_body(pb.ChatRequest(endpoint="c", sampling=pb.Sampling(temperature=0)))
    assert body["temperature"] == 0


def test_completion_and_embedding_bodies():
    body = grpc_api.complete_body(pb.CompleteRequest(endpoint="c", prompt="p", echo=True, logprobs=0,
                                                     sampling=pb.Sampling(max_tokens=3)))
    assert body == {"model": "c", "prompt": "p", "echo": True, "logprobs": 0, "max_tokens": 3,
                    "stream": True, "stream_options": {"include_usage": True}}
    assert parse_completion(body, None).requests[0].echo
    body = grpc_api.embed_body(pb.EmbedRequest(endpoint="e", texts=["a", "b"], dimensions=8,
                                               instruction="q: ", encoding=pb.EMBEDDING_ENCODING_BYTES))
    assert body == {"model": "e", "input": ["a", "b"], "dimensions": 8, "instruction": "q: ",
                    "encoding_format": "base64"}


@pytest.mark.parametrize(
    "rest, fields, grpc_",
    [
        ("temperature", grpc_api._CHAT_FIELDS, "sampling.temperature"),
        ("response_format.json_schema", grpc_api._CHAT_FIELDS, "sampling.response_format.json_schema"),
        ("messages[2].role", grpc_api._CHAT_FIELDS, "messages[2].role"),
        ("model", grpc_api._CHAT_FIELDS, "endpoint"),
        ("top_logprobs", grpc_api._COMPLETE_FIELDS, "logprobs"),
        ("logprobs", grpc_api._COMPLETE_FIELDS, "logprobs"),
        ("input", grpc_api._EMBED_FIELDS, "texts"),
        ("tools[0].function.parameters", grpc_api._CHAT_FIELDS, "tools[0].function.parameters"),
    ],
)
def test_rest_parameters_are_named_as_the_grpc_fields(rest, fields, grpc_):
    assert grpc_api.public_field(rest, fields) == grpc_


def test_a_refusal_names_the_grpc_field_in_its_detail_and_its_message():
    exc = InvalidArgument("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    grpc_api._rename(exc, grpc_api._CHAT_FIELDS)
    assert exc.param == "sampling.top_logprobs"
    assert exc.message == "'sampling.top_logprobs' needs 'logprobs': true"
    exc = InvalidArgument("'response_format.json_schema.schema' must be a JSON schema object",
                          param="response_format")
    grpc_api._rename(exc, grpc_api._CHAT_FIELDS)
    assert exc.message == "'sampling.response_format.json_schema.schema' must be a JSON schema object"
    # An endpoint name that starts like the parameter is a value, not the parameter.
    exc = InvalidArgument("endpoint 'model.v2' does not exist; 'model' names an endpoint", param="model")
    grpc_api._rename(exc, grpc_api._CHAT_FIELDS)
    assert exc.message == "endpoint 'model.v2' does not exist; 'endpoint' names an endpoint"
    # A word that only looks like the parameter is left alone.
    exc = InvalidArgument("'n' is too large; 'nx' is fine", param="n")
    grpc_api._rename(exc, grpc_api._CHAT_FIELDS)
    assert exc.message == "'sampling.n' is too large; 'nx' is fine"


@pytest.mark.parametrize("text", ["{", "[" * 100_000 + "]" * 100_000])
def test_json_text_fields_that_are_not_json_are_refused_by_name(text):
    req = pb.ChatRequest(endpoint="c", tools=[pb.Tool(function=pb.FunctionDefinition(name="f", parameters_json=text))])
    with pytest.raises(InvalidArgument) as err:
        grpc_api.chat_body(req)
    assert err.value.param == "tools[0].function.parameters_json"


def _endpoint() -> routing_pb2.Endpoint:
    ep = routing_pb2.Endpoint(name="e", task=routing_pb2.TASK_CHAT,
                              capacity_mode=routing_pb2.CAPACITY_MODE_PROVISIONED_THROUGHPUT,
                              served_entities=[routing_pb2.ServedEntity(name="m", model="m")])
    ep.limits.requests_per_minute = 5
    ep.limits.endpoint.requests_per_minute = 50
    ep.limits.default_max_tokens = 32
    for who, calls in (("alice", 7), ("bob", 9)):
        ep.limits.principals.add(principal=who).limits.requests_per_minute = calls
    return ep


def test_a_model_shows_the_limits_that_apply_to_its_caller():
    alice = Identity(principal="alice", workspace="w", token_id="t", scopes=("*",))
    model = grpc_api.describe(_endpoint(), {"m"}, alice)
    assert model.ready and model.task == "llm/v1/chat" and model.default_max_tokens == 32
    assert model.capacity_mode == pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT
    assert [(r.key, r.principal, r.calls) for r in model.rate_limits] == [
        ("endpoint", "", 50), ("user", "", 5), ("service_principal", "", 5), ("user", "alice", 7)]
    admin = Identity(principal="root", workspace="w", token_id="t", scopes=("*",), admin=True)
    assert len(grpc_api.describe(_endpoint(), set(), admin).rate_limits) == 5
    assert not grpc_api.describe(_endpoint(), set(), admin).ready
