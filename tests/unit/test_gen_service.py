"""The generation use case on a scripted engine: the "accepted" first step, prompt caps before any
engine work, and an engine failure surfacing as an error (never as a normal stop)."""

from __future__ import annotations

import json

import pytest

from fmapi_common.errors import Internal, InvalidArgument
from fmapi_generation.domain import (
    ChoiceStep,
    FinishReason,
    GenerateInput,
    ResponseFormat,
    Sampling,
)
from fmapi_generation.service import GenerationService
from fmapi_generation.validation import Limits
from helpers.tiny_llm import build_tiny_tokenizer


class ScriptedEngine:
    model = "tiny"
    max_model_len = 2048
    vocab_size = 1024

    def __init__(self, tokenizer, script):
        self.tokenizer = tokenizer
        self.script = script  # steps; None: nothing new for the keep-alive interval
        self.calls = []
        self.keepalives = []

    def running_requests(self) -> int:
        return 0

    async def generate(self, prompt_ids, sampling, request_id, *, raw=False, keepalive=0.0):
        self.calls.append((prompt_ids, sampling))
        self.keepalives.append(keepalive)
        yield []  # accepted
        for step in self.script:
            yield step

    def tool_parser(self):
        return None

    def dead(self) -> bool:
        return False

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def service(tokenizer, script, **limits) -> tuple[GenerationService, ScriptedEngine]:
    engine = ScriptedEngine(tokenizer, script)
    return GenerationService(engine, Limits(**limits)), engine


async def steps(svc, req):
    return [s async for s in svc.generate(req)]


async def test_first_step_is_empty_then_echo_then_output(tokenizer):
    svc, _ = service(tokenizer, [[ChoiceStep(0, " there", 1, finish_reason=FinishReason.STOP)]])
    out = await steps(svc, GenerateInput(prompt="hello", echo=True))
    assert out[0].choices == [] and out[0].usage is None
    assert out[1].choices[0].text == "hello"
    assert out[2].choices[0].text == " there"
    assert out[-1].usage.completion_tokens == 1


async def test_a_quiet_engine_becomes_an_empty_keepalive_step(tokenizer):
    """The engine's None (no output for the request's keep-alive interval) is sent on as a
    step with nothing in it, which the servicer turns into an empty message."""
    svc, engine = service(tokenizer, [None, None, [ChoiceStep(0, " hi", 1, finish_reason=FinishReason.STOP)]])
    out = await steps(svc, GenerateInput(prompt="hello", keepalive_s=0.25))
    assert engine.keepalives == [0.25]
    assert [(s.choices, s.usage, s.admission) for s in out[1:3]] == [([], None, None)] * 2
    assert out[3].choices[0].text == " hi"
    assert out[-1].usage.completion_tokens == 1


async def test_prompt_cap_refuses_before_the_engine(tokenizer):
    svc, engine = service(tokenizer, [], max_prompt_tokens=8)
    with pytest.raises(InvalidArgument) as ei:
        await steps(svc, GenerateInput(prompt="hello world " * 10))
    assert ei.value.param == "prompt" and "at most 8 tokens" in ei.value.message
    with pytest.raises(InvalidArgument) as ei:
        await steps(svc, GenerateInput(prompt="hello world", max_prompt_tokens=2))
    assert "at most 2 tokens" in ei.value.message
    assert engine.calls == []


@pytest.mark.parametrize(
    "req, error, param",
    [
        (GenerateInput(prompt="hi"), Internal, None),
        (
            GenerateInput(
                prompt="hi",
                sampling=Sampling(
                    response_format=ResponseFormat.JSON_SCHEMA,
                    json_schema=json.dumps({"type": "object"}),
                ),
            ),
            InvalidArgument,
            "response_format",
        ),
    ],
    ids=["plain", "json_schema"],
)
async def test_engine_error_is_raised_not_a_stop(tokenizer, req, error, param):
    svc, _ = service(
        tokenizer,
        [[ChoiceStep(0, '{"a":', 3)], [ChoiceStep(0, "", 0, finish_reason=FinishReason.ERROR)]],
    )
    seen = []
    with pytest.raises(error) as ei:
        async for step in svc.generate(req):
            seen.append(step)
    assert ei.value.param == param
    assert not any(c.finish_reason for s in seen for c in s.choices)
    assert svc.inflight == 0
