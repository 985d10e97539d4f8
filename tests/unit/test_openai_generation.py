"""Parsing OpenAI chat/completions bodies: shapes, types and ranges that protos cannot hold."""

from __future__ import annotations

import pytest

from fmapi_common.errors import InvalidArgument
from fmapi_gateway.openai_generation import parse_chat, parse_completion

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"seed": 1e30}, "seed"),
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"n": 2**40}, "n"),
        ({"top_k": 2**33}, "top_k"),
        ({"logprobs": True, "top_logprobs": 2**33}, "top_logprobs"),
        ({"n": "2"}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"stop": [1]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ],
)
def test_bad_chat_bodies_are_refused_naming_the_parameter(extra, param):
    with pytest.raises(InvalidArgument) as exc:
        parse_chat({"model": "m", "messages": HI, **extra}, None)
    assert exc.value.param == param


def test_chat_translation_keeps_what_the_caller_sent():
    call = parse_chat({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "seed": 2**62, "stop": "x", "n": 2, "extra_params": {"top_k": 5}}, None)
    req = call.requests[0]
    assert req.chat.messages[0].content == "ab"
    assert req.sampling.seed == 2**62 and list(req.sampling.stop) == ["x"]
    assert req.sampling.top_k == 5 and call.n == 2
    assert not req.sampling.HasField("max_tokens") and not call.max_tokens_given


def test_completion_prompts():
    assert len(parse_completion({"model": "m", "prompt": ["a", "b"]}, None).requests) == 2
    for prompt in (None, [], [[1, 2]], 5):
        with pytest.raises(InvalidArgument):
            parse_completion({"model": "m", "prompt": prompt}, None)
    with pytest.raises(InvalidArgument):
        parse_completion({"model": "m", "prompt": "a", "suffix": "b"}, None)
