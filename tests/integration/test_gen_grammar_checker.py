"""The structured-output grammar checker on its own: a real xgrammar worker process on the tiny
test tokenizer (no engine). The checks against the running generation service are in
test_generation_service.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fmapi_common.errors import InvalidArgument
from fmapi_generation.grammar import GrammarChecker, tokenizer_info_json
from helpers.tiny_llm import build_tiny_tokenizer

# 47 bytes that take xgrammar about 36 s to compile on the tiny vocabulary (40 s on Gemma's).
SLOW = {"type": "string", "pattern": "[a-z]{1,20000}"}
TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
async def checker(tmp_path_factory):
    tok = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    info = await asyncio.to_thread(tokenizer_info_json, tok, len(tok))
    checker = GrammarChecker(info, any_whitespace=False, timeout_s=TIMEOUT_S)
    checker.start()
    yield checker
    await checker.close()


async def refused(checker, schema, param="response_format") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as ei:
        await checker.check(schema, param)
    assert ei.value.param == param
    return ei.value


async def test_good_schema_passes_once_and_is_cached(checker):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    before = checker.compiles
    await asyncio.gather(*(checker.check(schema, "response_format") for _ in range(3)))
    await checker.check(schema, "tools")
    assert checker.compiles == before + 1  # concurrent checks share one compile, then cached


async def test_schema_that_admits_nothing_is_refused(checker):
    err = await refused(checker, {"$ref": "#"})
    assert "admits no JSON value" in err.message
    cycle = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    await refused(checker, cycle, "tools")


async def test_schema_the_compiler_rejects_is_refused(checker):
    err = await refused(checker, {"enum": []})
    assert "cannot be compiled" in err.message and "enum" in err.message


async def test_slow_compile_is_cut_off_and_the_worker_replaced(checker):
    await checker.check({"type": "boolean"}, "response_format")  # the worker is up
    start = time.monotonic()
    err = await refused(checker, SLOW)
    took = time.monotonic() - start
    assert "within 1.5 s" in err.message
    assert took < TIMEOUT_S + 1.0, took
    # The killed worker is replaced: the next schema compiles (after the new worker starts).
    await checker.check({"type": "array", "items": {"type": "string"}}, "response_format")
    # A timeout is not cached: the same schema is compiled (and cut off) again.
    before = checker.compiles
    await refused(checker, SLOW)
    assert checker.compiles == before + 1
