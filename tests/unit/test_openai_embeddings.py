"""Parsing OpenAI embeddings requests: the four input shapes and the clear errors."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from fmapi_common.errors import InvalidArgument
from fmapi_gateway.embeddings import Embeddings
from fmapi_gateway.openai_embeddings import parse_input, parse_request, render


@pytest.mark.parametrize(
    "value, expected",
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_input_shapes(value, expected):
    assert parse_input(value) == expected


@pytest.mark.parametrize(
    "value", [None, 5, {}, [], [True, False], ["a", 1], [[1, "x"]], [1.5], [[2**40]], [-1]]
)
def test_bad_inputs(value):
    with pytest.raises(InvalidArgument) as exc:
        parse_input(value)
    assert exc.value.param == "input"


def test_invocations_take_the_endpoint_from_the_path():
    req = parse_request({"input": "x"}, endpoint="e")
    assert req["endpoint"] == "e" and req["encoding_format"] == "float"


def test_base64_is_little_endian_float32():
    vecs = np.array([[1.0, -2.5, 3.25]], dtype=np.float32)
    out = render(Embeddings("e", vecs, 3), "base64")
    raw = base64.b64decode(out["data"][0]["embedding"])
    assert np.frombuffer(raw, dtype="<f4").tolist() == [1.0, -2.5, 3.25]
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
