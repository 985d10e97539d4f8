"""Tool calls: the JSON schema that forces a valid call, and reading the call back.

Forced calls (tool_choice ``required`` or a function name) work on any model: decoding is
constrained to JSON, so the arguments always parse and match the tool's parameter schema.

- a named function: the output *is* the arguments object (the function's parameter schema);
- ``required``: the output is ``{"name": <one of the tools>, "arguments": {...}}``, an ``anyOf``
  over the tools, so the arguments match the schema of the tool named.

One call per choice (no parallel calls when forced). ``auto`` needs the model to decide between
text and a call in its own format, so it needs a vLLM tool-call parser for that model
(config ``tool_call_parser``); see :func:`parse_auto`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .domain import Tool


def forced_schema(tools: list[Tool], name: str | None) -> dict[str, Any]:
    """The JSON schema the output must follow for a forced call (``name`` None = required)."""
    if name is not None:
        return next(t.parameters for t in tools if t.name == name)
    # Each tool's parameter schema goes under $defs, its own references ("#", "#/$defs/...")
    # rebased there, so that they still point inside it.
    defs = {f"tool_{i}": _rebase(t.parameters, f"#/$defs/tool_{i}") for i, t in enumerate(tools)}
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": {"$ref": f"#/$defs/tool_{i}"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for i, t in enumerate(tools)
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {**schema, "$defs": defs}


def _rebase(schema: Any, base: str) -> Any:
    """``schema``, moved to the JSON pointer ``base``, with its local references rewritten."""
    if isinstance(schema, list):
        return [_rebase(v, base) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = base + value[1:]
        else:
            out[key] = _rebase(value, base)
    return out


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    """One tool call in OpenAI's shape (``arguments`` is a JSON string)."""
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def parse_forced(text: str, tools: list[Tool], name: str | None) -> list[dict[str, Any]] | None:
    """The tool calls in a forced call's output, or None when it is not a complete call
    (only when generation stopped early, e.g. at max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if name is not None:
        if not isinstance(value, dict):
            return None
        return [tool_call(name, json.dumps(value, ensure_ascii=False))]
    if not isinstance(value, dict) or value.get("name") not in {t.name for t in tools}:
        return None
    return [tool_call(value["name"], json.dumps(value.get("arguments", {}), ensure_ascii=False))]


def parse_auto(
    parser: Any, text: str, tools: list[dict[str, Any]]
) -> tuple[str | None, list[dict[str, Any]] | None]:
    """Split a finished ``auto`` output into (content, tool calls) with a vLLM tool parser.

    ``parser`` is an instance of a vLLM ``ToolParser`` (built once by the engine).
    """
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    request = ChatCompletionRequest(
        model="fmapi", messages=[{"role": "user", "content": ""}], tools=tools, tool_choice="auto"
    )
    info = parser.extract_tool_calls(text, request)
    if not info.tools_called or not info.tool_calls:
        return text, None
    calls = [tool_call(c.function.name, c.function.arguments or "{}") for c in info.tool_calls]
    return info.content or None, calls
