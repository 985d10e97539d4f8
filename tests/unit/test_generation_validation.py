"""Request validation of the generation service: every bad input is a 400 naming its param."""

from __future__ import annotations

import json

import pytest

from fmapi_common.errors import InvalidArgument
from fmapi_generation.domain import GenerateInput, Message, ResponseFormat, Sampling
from fmapi_generation.validation import Limits, ToolMode, resolve_max_tokens, validate

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def chat(*msgs, **kw) -> GenerateInput:
    messages = [Message(role=r, content=c) for r, c in msgs] if msgs else [Message("user", "hi")]
    sampling = kw.pop("sampling", Sampling())
    return GenerateInput(messages=messages, sampling=sampling, **kw)


def bad(
    req: GenerateInput, param: str, *words: str, limits: Limits | None = None
) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as ei:
        validate(req, limits or Limits())
    err = ei.value
    assert err.param == param, (err.param, err.message)
    for w in words:
        assert w in err.message, err.message
    return err


def test_defaults_follow_openai():
    plan = validate(GenerateInput(prompt="Once upon a time"))
    s = plan.sampling
    assert (s.n, s.temperature, s.top_p, s.top_k) == (1, 1.0, 1.0, 0)
    assert s.logprobs is None and s.json_schema is None and not s.json_object
    assert plan.max_tokens is None and plan.messages is None and plan.input_param == "prompt"


def test_valid_chat_keeps_roles_and_maps_developer_to_system():
    plan = validate(
        chat(("developer", "be brief"), ("user", "hi"), ("assistant", "hello"), ("tool", "42"))
    )
    assert [m["role"] for m in plan.messages] == ["system", "user", "assistant", "tool"]
    assert plan.input_param == "messages" and plan.tool_mode == ToolMode.NONE


@pytest.mark.parametrize(
    "sampling, param, words",
    [
        (Sampling(temperature=2.5), "temperature", ["between 0 and 2", "2.5"]),
        (Sampling(temperature=-0.1), "temperature", ["between 0 and 2"]),
        (Sampling(temperature=float("nan")), "temperature", ["finite"]),
        (Sampling(top_p=0.0), "top_p", ["greater than 0"]),
        (Sampling(top_p=1.5), "top_p", ["at most 1"]),
        (Sampling(top_k=-5), "top_k", ["-5"]),
        (Sampling(n=0), "n", ["between 1 and 16", "got 0"]),
        (Sampling(n=17), "n", ["between 1 and 16"]),
        (Sampling(max_tokens=0), "max_tokens", ["at least 1"]),
        (Sampling(max_tokens=-3), "max_tokens", ["at least 1"]),
        (Sampling(presence_penalty=2.5), "presence_penalty", ["between -2 and 2"]),
        (Sampling(frequency_penalty=-3), "frequency_penalty", ["between -2 and 2"]),
        (Sampling(stop=["ok", ""]), "stop", ["empty"]),
        (Sampling(stop=[str(i) for i in range(17)]), "stop", ["at most 16"]),
        (Sampling(logprobs=True, top_logprobs=21), "top_logprobs", ["between 0 and 20"]),
        (Sampling(top_logprobs=3), "top_logprobs", ["logprobs"]),
    ],
)
def test_out_of_range_sampling(sampling, param, words):
    bad(GenerateInput(prompt="x", sampling=sampling), param, *words)


def test_in_range_edges_pass():
    s = validate(
        GenerateInput(
            prompt="x",
            sampling=Sampling(
                temperature=0,
                top_p=1,
                top_k=-1,
                n=16,
                max_tokens=1,
                presence_penalty=-2,
                frequency_penalty=2,
                logprobs=True,
                top_logprobs=20,
                seed=-1,
                stop=["a", "b"],
            ),
        )
    ).sampling
    assert (s.temperature, s.top_k, s.n, s.logprobs, s.seed) == (0.0, 0, 16, 20, -1)


def test_logprobs_without_alternatives():
    assert (
        validate(GenerateInput(prompt="x", sampling=Sampling(logprobs=True))).sampling.logprobs == 0
    )


def test_messages_checks():
    bad(GenerateInput(messages=[]), "messages", "at least one")
    bad(
        chat(("user", "hi"), ("wizard", "abracadabra")),
        "messages[1].role",
        "wizard",
        "system, user",
    )
    bad(GenerateInput(), "messages", "prompt or messages")
    bad(chat(echo=True), "echo", "completions")
    req = chat()
    req.messages[0].tool_calls_json = "[]"
    bad(req, "messages[0].tool_calls", "assistant")
    req = GenerateInput(messages=[Message("assistant", "", tool_calls_json="{oops")])
    bad(req, "messages[0].tool_calls", "not valid JSON")


def test_completion_prompt_rejects_chat_only_fields():
    bad(GenerateInput(prompt="x", tools_json=json.dumps([WEATHER])), "tools", "chat")
    bad(GenerateInput(prompt="x", chat_template="{{ x }}"), "chat_template")


def test_response_formats():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    s = validate(
        GenerateInput(
            prompt="x",
            sampling=Sampling(
                response_format=ResponseFormat.JSON_SCHEMA, json_schema=json.dumps(schema)
            ),
        )
    ).sampling
    assert s.json_schema == schema
    s = validate(
        GenerateInput(prompt="x", sampling=Sampling(response_format=ResponseFormat.JSON_OBJECT))
    ).sampling
    assert s.json_object and s.json_schema is None


@pytest.mark.parametrize(
    "raw, words",
    [
        ("", ["needs a schema"]),
        ("{not json", ["not valid JSON"]),
        ('"a string"', ["JSON schema object"]),
        ('{"type": "banana"}', ["not a valid JSON schema", "type"]),
        (
            '{"type": "object", "properties": {"a": {"minimum": "zero"}}}',
            ["not a valid JSON schema"],
        ),
    ],
)
def test_bad_json_schema(raw, words):
    req = GenerateInput(
        prompt="x", sampling=Sampling(response_format=ResponseFormat.JSON_SCHEMA, json_schema=raw)
    )
    bad(req, "response_format.json_schema", *words)


def test_schema_without_json_schema_format_is_refused():
    req = GenerateInput(prompt="x", sampling=Sampling(json_schema='{"type": "object"}'))
    bad(req, "response_format.json_schema", "not json_schema")


# ---------------------------------------------------------------- tools


def tools_req(choice: str, tools=(WEATHER,), **kw) -> GenerateInput:
    return chat(tools_json=json.dumps(list(tools)), tool_choice=choice, **kw)


def test_tool_choice_modes():
    plan = validate(tools_req("required"))
    assert plan.tool_mode == ToolMode.REQUIRED and plan.forced_tool
    assert (
        plan.tools[0].name == "get_weather"
        and plan.template_tools()[0]["function"]["name"] == "get_weather"
    )
    plan = validate(tools_req("get_weather"))
    assert (plan.tool_mode, plan.tool_name) == (ToolMode.NAMED, "get_weather")
    plan = validate(tools_req('{"type": "function", "function": {"name": "get_weather"}}'))
    assert plan.tool_name == "get_weather"
    plan = validate(tools_req("none"))
    assert plan.tool_mode == ToolMode.NONE and plan.template_tools() is None
    assert validate(tools_req("auto"), Limits(auto_tools=True)).tool_mode == ToolMode.AUTO


def test_tool_choice_errors():
    err = bad(tools_req("auto"), "tool_choice", "auto", "required", limits=Limits(model="gemma"))
    assert "gemma" in err.message
    # OpenAI's default with tools is auto: refused the same way on a model without a parser.
    bad(tools_req(""), "tool_choice", "auto")
    bad(tools_req("get_time"), "tool_choice", "get_time", "get_weather")
    bad(chat(tool_choice="required"), "tool_choice", "needs tools")
    bad(tools_req('{"type": "function"}'), "tool_choice")


def test_tool_definition_errors():
    bad(chat(tools_json="{"), "tools", "not valid JSON")
    bad(chat(tools_json='{"a": 1}'), "tools", "list")
    bad(tools_req("required", tools=[{"type": "retrieval"}]), "tools[0].type", "function")
    bad(
        tools_req("required", tools=[{"type": "function", "function": {"name": "has space"}}]),
        "tools[0].function.name",
    )
    bad(tools_req("required", tools=[WEATHER, WEATHER]), "tools[1].function.name", "twice")
    broken = {"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}
    bad(
        tools_req("required", tools=[broken]),
        "tools[0].function.parameters",
        "not a valid JSON schema",
    )


def test_tool_without_parameters_gets_an_empty_object_schema():
    plan = validate(tools_req("f", tools=[{"type": "function", "function": {"name": "f"}}]))
    assert plan.tools[0].parameters == {"type": "object", "properties": {}}


def test_forced_tool_and_response_format_conflict():
    req = tools_req("required", sampling=Sampling(response_format=ResponseFormat.JSON_OBJECT))
    bad(req, "response_format", "tool")


# ---------------------------------------------------------------- lengths


def test_resolve_max_tokens():
    assert resolve_max_tokens(10, None, 100, "prompt") == 90
    assert resolve_max_tokens(10, 90, 100, "prompt") == 90
    with pytest.raises(InvalidArgument) as ei:
        resolve_max_tokens(10, 91, 100, "messages")
    assert ei.value.param == "max_tokens"
    assert "at most 90" in ei.value.message and "100-token context" in ei.value.message
    with pytest.raises(InvalidArgument) as ei:
        resolve_max_tokens(100, None, 100, "messages")
    assert ei.value.param == "messages" and "100 tokens long" in ei.value.message


# ---------------------------------------------------------------- prompt caps (finding 5)


def test_prompt_longer_than_its_cap_is_refused_with_both_numbers():
    # The cap is checked before the context: a 20k-token prompt never reaches the engine.
    with pytest.raises(InvalidArgument) as ei:
        resolve_max_tokens(20_000, None, 32_768, "messages", max_prompt_tokens=8192)
    err = ei.value
    assert err.param == "messages" and "20000" in err.message and "8192" in err.message
    assert resolve_max_tokens(8192, None, 32_768, "prompt", max_prompt_tokens=8192) == 24_576
    # 0 = no cap but the context.
    assert resolve_max_tokens(20_000, 10, 32_768, "prompt", max_prompt_tokens=0) == 10


def test_the_endpoint_cap_overrides_the_service_default():
    limits = Limits(max_prompt_tokens=8192)
    assert validate(GenerateInput(prompt="x"), limits).max_prompt_tokens == 8192
    plan = validate(GenerateInput(prompt="x", max_prompt_tokens=100), limits)
    assert plan.max_prompt_tokens == 100
    assert (
        validate(GenerateInput(prompt="x", max_prompt_tokens=16_000), limits).max_prompt_tokens
        == 16_000
    )
    assert validate(GenerateInput(prompt="x")).max_prompt_tokens == 0
    bad(GenerateInput(prompt="x", max_prompt_tokens=-1), "max_prompt_tokens")


# ---------------------------------------------------------------- schema bounds (finding 9)


def schema_req(schema) -> GenerateInput:
    return GenerateInput(
        prompt="x",
        sampling=Sampling(
            response_format=ResponseFormat.JSON_SCHEMA, json_schema=json.dumps(schema)
        ),
    )


@pytest.mark.parametrize(
    "schema",
    [
        {"enum": [f"value{i}" for i in range(50_000)]},  # ~700 KB
        {"const": "x" * 1_000_000},  # 1 MB
    ],
    ids=["enum-50k", "const-1MB"],
)
def test_oversized_response_format_schema_is_refused_before_parsing(schema):
    err = bad(schema_req(schema), "response_format", "bytes", "65536")
    assert str(len(json.dumps(schema))) in err.message


def test_schema_size_bound_is_configurable():
    schema = {"const": "x" * 2000}
    bad(schema_req(schema), "response_format", "1024", limits=Limits(max_schema_bytes=1024))
    assert validate(schema_req(schema)).schema_param == "response_format"


def test_forced_tool_schema_is_bounded_and_named_tools():
    big = {
        "type": "function",
        "function": {"name": "f", "parameters": {"enum": [f"v{i}" for i in range(20_000)]}},
    }
    bad(tools_req("required", tools=[big]), "tools", "bytes")
    bad(tools_req("f", tools=[big]), "tools", "bytes")
    # Not forced: the tools only reach the prompt (bounded by the prompt cap), no grammar.
    plan = validate(tools_req("none", tools=[big]))
    assert plan.schema_param is None and plan.sampling.json_schema is None
    plan = validate(tools_req("get_weather"))
    assert plan.schema_param == "tools"
    assert plan.sampling.json_schema == WEATHER["function"]["parameters"]


# ---------------------------------------------------------------- logit_bias (finding 13)


def test_logit_bias_ranges():
    s = validate(GenerateInput(prompt="x", sampling=Sampling(logit_bias={5: -100, 7: 100.0})))
    assert s.sampling.logit_bias == {5: -100.0, 7: 100.0}
    assert validate(GenerateInput(prompt="x")).sampling.logit_bias is None
    for bias, words in [
        ({5: 100.5}, ["between -100 and 100", "100.5", "token 5"]),
        ({5: -101}, ["between -100 and 100"]),
        ({5: float("nan")}, ["between -100 and 100"]),
        ({-1: 1}, ["token ids"]),
        ({i: 1.0 for i in range(301)}, ["at most 300", "301"]),
    ]:
        bad(GenerateInput(prompt="x", sampling=Sampling(logit_bias=bias)), "logit_bias", *words)
