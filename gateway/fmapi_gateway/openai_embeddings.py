"""OpenAI-shaped embeddings requests and responses (also used by the Databricks paths)."""

from __future__ import annotations

import base64

import numpy as np

from fmapi_common.errors import InvalidArgument

from .embeddings import Embeddings

_INPUT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_token(v) -> bool:
    """A token id: an integer that fits the proto's int32 (the model checks its vocabulary)."""
    return _is_int(v) and 0 <= v < 2**31


def parse_input(value) -> list[str] | list[list[int]]:
    """Normalise OpenAI's four input shapes into a list of texts or a list of token lists."""
    if value is None:
        raise InvalidArgument("'input' is required", param="input")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise InvalidArgument(f"'input' must be {_INPUT_SHAPES}", param="input")
    if not value:
        raise InvalidArgument("'input' must not be empty", param="input")
    if all(isinstance(v, str) for v in value):
        return value
    if all(_is_token(v) for v in value):
        return [value]
    if all(isinstance(v, list) and all(_is_token(t) for t in v) for v in value):
        return value
    raise InvalidArgument(f"'input' must be {_INPUT_SHAPES}", param="input")


def parse_request(body: dict, endpoint: str | None) -> dict:
    """Validate an embeddings body; ``endpoint`` comes from the path on Databricks' invocations."""
    model = endpoint if endpoint is not None else body.get("model")
    if endpoint is None and (not isinstance(model, str) or not model):
        raise InvalidArgument("'model' is required and must name an endpoint", param="model")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise InvalidArgument(
            f"'encoding_format' must be 'float' or 'base64', not {fmt!r}", param="encoding_format"
        )
    dims = body.get("dimensions")
    if dims is not None and (not _is_int(dims) or not 1 <= dims < 2**31):
        raise InvalidArgument("'dimensions' must be a positive integer", param="dimensions")
    instruction = body.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise InvalidArgument("'instruction' must be a string", param="instruction")
    return {
        "endpoint": model,
        "inputs": parse_input(body.get("input")),
        "encoding_format": fmt,
        "dimensions": dims,
        "instruction": instruction,
    }


def render(result: Embeddings, encoding_format: str) -> dict:
    if encoding_format == "base64":
        vecs = result.vectors.astype("<f4", copy=False)
        data = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(v.tobytes()).decode()}
            for i, v in enumerate(vecs)
        ]
    else:
        data = [
            {"object": "embedding", "index": i, "embedding": v}
            for i, v in enumerate(np.ascontiguousarray(result.vectors))
        ]
    return {
        "object": "list",
        "data": data,
        "model": result.endpoint,
        "usage": {"prompt_tokens": result.input_tokens, "total_tokens": result.input_tokens},
    }
