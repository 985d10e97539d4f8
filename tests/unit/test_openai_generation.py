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
        ({"ignore_eos": "yes"}, "ignore_eos"),
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
    assert not req.sampling.ignore_eos
    assert parse_chat({"model": "m", "messages": HI, "ignore_eos": True}, None).requests[0].sampling.ignore_eos


def test_completion_prompts():
    assert len(parse_completion({"model": "m", "prompt": ["a", "b"]}, None).requests) == 2
    for prompt in (None, [], [[1, 2]], 5):
        with pytest.raises(InvalidArgument):
            parse_completion({"model": "m", "prompt": prompt}, None)
    with pytest.raises(InvalidArgument):
        parse_completion({"model": "m", "prompt": "a", "suffix": "b"}, None)


# ---------------------------------------------------------------- fan-out bounds (finding 6)


def test_prompt_list_is_bounded():
    # The probe: 2000 prompts opened 2000 generation streams and broke other callers' chats.
    with pytest.raises(InvalidArgument) as exc:
        parse_completion({"model": "m", "prompt": ["hi"] * 2000}, None)
    assert exc.value.param == "prompt"
    assert "2000" in exc.value.message and "at most 64" in exc.value.message
    assert len(parse_completion({"model": "m", "prompt": ["hi"] * 64}, None).requests) == 64


def test_prompts_times_n_is_bounded():
    with pytest.raises(InvalidArgument) as exc:
        parse_completion({"model": "m", "prompt": ["hi"] * 10, "n": 13}, None)
    assert exc.value.param == "prompt"
    assert "130" in exc.value.message and "at most 128" in exc.value.message
    assert parse_completion({"model": "m", "prompt": ["hi"] * 8, "n": 16}, None).n == 16
    with pytest.raises(InvalidArgument) as exc:
        parse_chat({"model": "m", "messages": HI, "n": 500}, None)
    assert exc.value.param == "n"


# ---------------------------------------------------------------- logit_bias, best_of, user


def test_logit_bias_is_carried_as_token_ids():
    call = parse_chat({"model": "m", "messages": HI, "logit_bias": {"50256": -100, "7": 2.5}}, None)
    assert dict(call.requests[0].sampling.logit_bias) == {50256: -100.0, 7: 2.5}
    call = parse_completion({"model": "m", "prompt": ["a", "b"], "logit_bias": {"3": 1}}, None)
    assert all(dict(r.sampling.logit_bias) == {3: 1.0} for r in call.requests)


@pytest.mark.parametrize(
    "bias, words",
    [
        ([1, 2], ["object"]),
        ("50256:-100", ["object"]),
        ({"hello": 1}, ["token ids", "'hello'"]),
        ({"-5": 1}, ["token ids"]),
        ({"1.5": 1}, ["token ids"]),
        ({"99999999999": 1}, ["token ids"]),
        ({"5": "high"}, ["numbers", "token 5"]),
        ({"5": True}, ["numbers"]),
        ({"5": None}, ["numbers"]),
    ],
)
def test_bad_logit_bias_shapes(bias, words):
    # Ranges ([-100, 100]) and the vocabulary are checked by the generation service (it knows
    # the model): see test_generation_validation.py and the integration tests.
    with pytest.raises(InvalidArgument) as exc:
        parse_chat({"model": "m", "messages": HI, "logit_bias": bias}, None)
    assert exc.value.param == "logit_bias"
    for w in words:
        assert w in exc.value.message, exc.value.message


def test_best_of_only_as_a_no_op():
    for body in ({}, {"best_of": None}, {"best_of": 1}, {"n": 3, "best_of": 3}):
        parse_completion({"model": "m", "prompt": "x", **body}, None)
    for body in ({"best_of": 2}, {"n": 2, "best_of": 4}, {"best_of": "2"}, {"best_of": 0}):
        with pytest.raises(InvalidArgument) as exc:
            parse_completion({"model": "m", "prompt": "x", **body}, None)
        assert exc.value.param == "best_of"
    with pytest.raises(InvalidArgument) as exc:
        parse_chat({"model": "m", "messages": HI, "best_of": 5}, None)
    assert exc.value.param == "best_of" and "not supported" in exc.value.message


def test_user_is_a_short_string_kept_on_the_call():
    assert parse_chat({"model": "m", "messages": HI, "user": "u-42"}, None).user == "u-42"
    assert parse_chat({"model": "m", "messages": HI}, None).user is None
    for user in (42, {"id": 1}, ["a"], "x" * 257):
        with pytest.raises(InvalidArgument) as exc:
            parse_completion({"model": "m", "prompt": "x", "user": user}, None)
        assert exc.value.param == "user" and "256" in exc.value.message
    assert parse_completion({"model": "m", "prompt": "x", "user": "x" * 256}, None).user
