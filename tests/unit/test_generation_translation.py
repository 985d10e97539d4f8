"""Request translation in the generation service: proto <-> domain <-> vLLM, prompts, tool calls.

No engine runs here; vLLM's own classes (SamplingParams, CompletionOutput, a tool parser) and the
tiny test tokenizer are real.
"""

from __future__ import annotations

import json
import math

import jsonschema
import pytest

from fmapi.generation.v1 import generation_pb2 as pb
from fmapi_common.errors import FailedPrecondition, InvalidArgument
from fmapi_generation import tools as toolcalls
from fmapi_generation.chat import PromptRenderer
from fmapi_generation.domain import (
    ChoiceStep,
    EngineSampling,
    FinishReason,
    ResponseFormat,
    Step,
    TokenLogprob,
    Tool,
    TopLogprob,
    Usage,
)
from fmapi_generation.servicer import request_from_proto, step_to_proto
from helpers.tiny_llm import build_tiny_tokenizer

WEATHER = Tool(
    "get_weather",
    "",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
)
TIME = Tool(
    "get_time", "", {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tinytok"))


# ---------------------------------------------------------------- proto -> domain


def test_unset_optional_fields_stay_unset():
    inp = request_from_proto(pb.GenerateRequest(prompt="hi"))
    s = inp.sampling
    assert inp.prompt == "hi" and inp.messages is None
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.n, s.seed) == (None,) * 6
    assert s.response_format == ResponseFormat.TEXT


def test_explicit_zero_is_kept_so_validation_can_refuse_it():
    inp = request_from_proto(
        pb.GenerateRequest(
            prompt="hi", sampling=pb.SamplingParams(max_tokens=0, n=0, temperature=0)
        )
    )
    assert (inp.sampling.max_tokens, inp.sampling.n, inp.sampling.temperature) == (0, 0, 0.0)


def test_chat_and_sampling_fields_are_carried():
    req = pb.GenerateRequest(
        request_id="r1",
        chat=pb.Chat(
            messages=[
                pb.ChatMessage(role="user", content="hi", name="ann"),
                pb.ChatMessage(role="tool", content="42", tool_call_id="call_1"),
            ],
            chat_template="{{ messages }}",
            tools_json="[]",
            tool_choice="required",
        ),
        sampling=pb.SamplingParams(
            max_tokens=7,
            top_k=3,
            stop=["x", "y"],
            seed=9,
            presence_penalty=0.5,
            logprobs=True,
            top_logprobs=2,
            response_format=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            json_schema="{}",
        ),
    )
    inp = request_from_proto(req)
    assert inp.request_id == "r1" and inp.prompt is None
    assert [(m.role, m.content, m.name, m.tool_call_id) for m in inp.messages] == [
        ("user", "hi", "ann", ""),
        ("tool", "42", "", "call_1"),
    ]
    assert (inp.chat_template, inp.tools_json, inp.tool_choice) == (
        "{{ messages }}",
        "[]",
        "required",
    )
    s = inp.sampling
    assert (s.max_tokens, s.top_k, s.stop, s.seed, s.logprobs, s.top_logprobs) == (
        7,
        3,
        ["x", "y"],
        9,
        True,
        2,
    )
    assert s.presence_penalty == 0.5 and s.response_format == ResponseFormat.JSON_SCHEMA


# ---------------------------------------------------------------- domain -> proto


def test_steps_to_proto():
    call = toolcalls.tool_call("get_weather", '{"city": "Oslo"}')
    msg = step_to_proto(
        Step(
            [
                ChoiceStep(
                    0,
                    "Hel",
                    1,
                    [
                        TokenLogprob(
                            "Hel", -0.5, [TopLogprob("Hel", -0.5), TopLogprob("He", -float("inf"))]
                        )
                    ],
                ),
                ChoiceStep(1, "", 0, finish_reason=FinishReason.TOOL_CALLS, tool_calls=[call]),
            ]
        )
    )
    assert not msg.HasField("usage")
    a, b = msg.choices
    assert (a.index, a.text, a.finish_reason) == (0, "Hel", pb.FINISH_REASON_UNSPECIFIED)
    assert a.logprobs[0].token == "Hel" and math.isclose(a.logprobs[0].logprob, -0.5)
    assert a.logprobs[0].top_logprobs[1].logprob == -9999.0  # -inf clamped
    assert b.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert json.loads(b.tool_calls_json)[0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Oslo"}',
    }
    last = step_to_proto(Step([], usage=Usage(5, 7)))
    assert not last.choices and (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 7)
    assert (
        step_to_proto(Step([ChoiceStep(0, finish_reason=FinishReason.LENGTH)]))
        .choices[0]
        .finish_reason
        == pb.FINISH_REASON_LENGTH
    )


# ---------------------------------------------------------------- domain -> vLLM


def test_sampling_params_for_vllm():
    from vllm.sampling_params import RequestOutputKind

    from fmapi_generation.engine import to_sampling_params

    sp = to_sampling_params(
        EngineSampling(
            max_tokens=12,
            n=2,
            temperature=0.3,
            top_p=0.9,
            top_k=5,
            stop=["END"],
            seed=7,
            presence_penalty=0.1,
            frequency_penalty=0.2,
            logprobs=3,
        )
    )
    assert (sp.max_tokens, sp.n, sp.top_k, sp.seed, sp.logprobs) == (12, 2, 5, 7, 3)
    assert math.isclose(sp.temperature, 0.3) and math.isclose(sp.top_p, 0.9)
    assert sp.stop == ["END"] and sp.output_kind == RequestOutputKind.DELTA
    assert sp.skip_special_tokens and sp.structured_outputs is None
    schema = {"type": "object"}
    sp = to_sampling_params(EngineSampling(max_tokens=1, json_schema=schema), raw=True)
    assert sp.structured_outputs.json == schema and not sp.skip_special_tokens
    sp = to_sampling_params(EngineSampling(max_tokens=1, json_object=True))
    assert sp.structured_outputs.json_object is True and sp.stop == []


def test_vllm_output_to_choice_step():
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput

    from fmapi_generation.engine import to_choice_step

    out = CompletionOutput(
        index=1,
        text=" world",
        token_ids=[11, 12],
        cumulative_logprob=None,
        # The sampled token (rank 3) comes back beside the top 2.
        logprobs=[
            {11: Logprob(-2.0, 3, " wor"), 5: Logprob(-0.1, 1, " the"), 6: Logprob(-1.0, 2, " a")},
            {12: Logprob(-0.2, 1, "ld"), 7: Logprob(-3.0, 2, "x")},
        ],
        finish_reason="length",
    )
    step = to_choice_step(out, 2)
    assert (step.index, step.text, step.num_tokens, step.finish_reason) == (
        1,
        " world",
        2,
        FinishReason.LENGTH,
    )
    first, second = step.logprobs
    assert (first.token, first.logprob) == (" wor", -2.0)
    assert [(t.token, t.logprob) for t in first.top] == [(" the", -0.1), (" a", -1.0)]
    assert [t.token for t in second.top] == ["ld", "x"]
    assert to_choice_step(out, None).logprobs == []
    assert to_choice_step(out, 0).logprobs[0].top == []


# ---------------------------------------------------------------- prompts


def test_chat_prompt_has_exactly_one_bos(tokenizer):
    r = PromptRenderer(tokenizer, model="tiny")
    text = r.render_chat([{"role": "user", "content": "hello"}])
    assert text.startswith("<s>")  # the template writes BOS, and the tokenizer adds one too
    ids = r.encode(text)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert ids == [tokenizer.bos_token_id] + tokenizer.encode(text[3:], add_special_tokens=False)
    assert text.endswith("<|assistant|>\n")


def test_completion_prompt_gets_bos(tokenizer):
    r = PromptRenderer(tokenizer)
    ids = r.encode("hello world")
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_tools_reach_the_template(tokenizer):
    r = PromptRenderer(tokenizer)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    assert "get_weather" in r.render_chat([{"role": "user", "content": "hi"}], tools)


def test_template_errors_are_invalid_argument(tokenizer):
    r = PromptRenderer(tokenizer)
    with pytest.raises(InvalidArgument) as ei:
        r.render_chat([{"role": "user", "content": "x"}], template="{% for %}")
    assert ei.value.param == "chat_template" and "does not compile" in ei.value.message
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok"
    with pytest.raises(InvalidArgument) as ei:
        r.render_chat([{"role": "assistant", "content": "x"}], template=strict)
    assert (
        ei.value.param == "messages" and "first message must be from the user" in ei.value.message
    )


def test_model_without_template_says_how_to_fix(tokenizer):
    r = PromptRenderer(tokenizer, model="tiny")
    r.default_template = None
    with pytest.raises(FailedPrecondition) as ei:
        r.render_chat([{"role": "user", "content": "x"}])
    assert "FMAPI_GENERATION_CHAT_TEMPLATE" in ei.value.message


# ---------------------------------------------------------------- tool calls


def test_required_schema_accepts_exactly_the_tools_calls():
    schema = toolcalls.forced_schema([WEATHER, TIME], None)
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, schema)
    jsonschema.validate({"name": "get_time", "arguments": {"tz": "UTC"}}, schema)
    for wrong in (
        {"name": "get_weather", "arguments": {"tz": "UTC"}},
        {"name": "launch", "arguments": {}},
        {"name": "get_time"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    assert toolcalls.forced_schema([WEATHER, TIME], "get_time") == TIME.parameters


def test_parse_forced_outputs():
    (call,) = toolcalls.parse_forced(
        '{"name":"get_time","arguments":{"tz":"UTC"}}', [WEATHER, TIME], None
    )
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_time" and json.loads(call["function"]["arguments"]) == {
        "tz": "UTC"
    }
    (call,) = toolcalls.parse_forced('{"city":"Oslo","unit":"f"}', [WEATHER], "get_weather")
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "unit": "f"}
    # Cut short by max_tokens: no call.
    assert toolcalls.parse_forced('{"city":"Os', [WEATHER], "get_weather") is None


def test_parse_auto_with_a_vllm_parser(tokenizer):
    from vllm.tool_parsers import ToolParserManager

    parser = ToolParserManager.get_tool_parser("hermes")(tokenizer)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": TIME.parameters}}]
    content, calls = toolcalls.parse_auto(
        parser,
        'Let me check. <tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>',
        tools,
    )
    assert content.strip() == "Let me check."
    assert calls[0]["function"]["name"] == "get_time" and json.loads(
        calls[0]["function"]["arguments"]
    ) == {"tz": "UTC"}
    content, calls = toolcalls.parse_auto(parser, "It is noon.", tools)
    assert (content, calls) == ("It is noon.", None)


# ---------------------------------------------------------------- JSON text


def test_control_characters_in_json_strings_are_escaped_across_chunks():
    from fmapi_generation.jsontext import ControlCharEscaper

    raw = '{"city":":g93\x04ull\\"one\x1a","n":1,"s":"a\\\\","t":"\n"}'
    chunks = [raw[i : i + 3] for i in range(0, len(raw), 3)]
    e = ControlCharEscaper()
    text = "".join(e.feed(c) for c in chunks)
    value = json.loads(text)  # strict: raw control characters would fail here
    assert value == {"city": ':g93\x04ull"one\x1a', "n": 1, "s": "a\\", "t": "\n"}
    with pytest.raises(ValueError):
        json.loads(raw)


def test_required_schema_keeps_each_tools_own_references():
    tree = Tool(
        "tree",
        "",
        {
            "type": "object",
            "properties": {
                "value": {"$ref": "#/$defs/leaf"},
                "children": {"type": "array", "items": {"$ref": "#"}},
            },
            "required": ["value"],
            "$defs": {"leaf": {"type": "integer"}},
        },
    )
    schema = toolcalls.forced_schema([WEATHER, tree], None)
    call = {"name": "tree", "arguments": {"value": 1, "children": [{"value": 2, "children": []}]}}
    jsonschema.validate(call, schema)
    for wrong in (
        {"name": "tree", "arguments": {"value": "one"}},
        {"name": "tree", "arguments": {"value": 1, "children": [{"value": "two"}]}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    assert toolcalls.forced_schema([tree], "tree") == tree.parameters


def test_logit_bias_and_prompt_cap_are_carried_to_vllm():
    from fmapi_generation.engine import to_sampling_params

    inp = request_from_proto(
        pb.GenerateRequest(
            prompt="hi", max_prompt_tokens=99, sampling=pb.SamplingParams(logit_bias={7: -100})
        )
    )
    assert inp.max_prompt_tokens == 99 and inp.sampling.logit_bias == {7: -100.0}
    sp = to_sampling_params(EngineSampling(max_tokens=1, logit_bias={7: -100.0}))
    assert sp.logit_bias == {7: -100.0}
    assert to_sampling_params(EngineSampling(max_tokens=1)).logit_bias is None


def test_engine_error_finish_is_not_a_stop():
    from vllm.outputs import CompletionOutput

    from fmapi_generation.engine import to_choice_step

    def out(reason):
        return CompletionOutput(
            index=0, text="", token_ids=[], cumulative_logprob=None, logprobs=None,
            finish_reason=reason,
        )

    assert to_choice_step(out("error"), None).finish_reason == FinishReason.ERROR
    assert to_choice_step(out("abort"), None).finish_reason == FinishReason.ABORT
    assert to_choice_step(out("repetition"), None).finish_reason == FinishReason.STOP


def test_chunked_prefill_defaults():
    from fmapi_generation.config import GenerationConfig
    from fmapi_generation.engine import chunked_prefill_settings

    def settings(cpu=True, **kw):
        config = GenerationConfig.model_construct(model_path="/m", **kw)
        return chunked_prefill_settings(config, cpu)

    assert settings() == (512, 256)
    assert settings(cpu=False) == (None, 1024)
    assert settings(max_model_len=128) == (512, 128)
    assert settings(long_prefill_token_threshold=0) == (512, 0)
    assert settings(max_num_batched_tokens=2048, long_prefill_token_threshold=4096) == (2048, 2048)
    assert settings(enable_chunked_prefill=False) == (None, 0)
