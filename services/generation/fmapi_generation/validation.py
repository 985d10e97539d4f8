"""Request validation: pure functions, no engine, no I/O.

Everything a caller can get wrong is caught here, before tokenization or the engine, and raised
as :class:`~fmapi_common.errors.InvalidArgument` naming the parameter (OpenAI's ``param``) and
the problem. The checks that need the prompt's token count (the prompt cap, prompt + max_tokens
against the context) are in :func:`resolve_max_tokens`, called right after tokenization; the one
that needs the grammar compiler (structured-output schemas) is in :mod:`.grammar`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fmapi_common.errors import InvalidArgument

from . import tools as toolcalls
from .domain import EngineSampling, GenerateInput, ResponseFormat, Tool

ROLES = ("system", "user", "assistant", "tool")
# OpenAI's newer name for the system role.
ROLE_ALIASES = {"developer": "system"}
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class Limits:
    """What this server accepts (config-driven where it varies by deployment)."""

    max_n: int = 16
    max_stop: int = 16
    max_top_logprobs: int = 20
    # Whether tool_choice "auto" can be honoured (a tool-call parser is configured).
    auto_tools: bool = False
    model: str = "this model"
    # Longest prompt (tokens) when the request's endpoint sets no cap; 0 = the context length.
    max_prompt_tokens: int = 0
    # Largest JSON schema to constrain decoding with (bytes of its JSON).
    max_schema_bytes: int = 65536
    max_logit_bias: int = 300


class ToolMode:
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


@dataclass
class Plan:
    """A validated request: what to render, how to decode, how to read the output back."""

    prompt: str | None
    # Template-ready messages (plain dicts), None for a completion prompt.
    messages: list[dict[str, Any]] | None
    chat_template: str | None
    tools: list[Tool] = field(default_factory=list)
    tool_mode: str = ToolMode.NONE
    tool_name: str | None = None
    # max_tokens as sent (None = fill the context); the engine value is set after tokenizing.
    max_tokens: int | None = None
    sampling: EngineSampling = field(default_factory=lambda: EngineSampling(max_tokens=1))
    echo: bool = False
    # Longest prompt accepted, in tokens (0 = no cap but the context).
    max_prompt_tokens: int = 0
    # The parameter a constrained-decoding schema came from ("response_format" or "tools"),
    # None when decoding is not constrained by a schema.
    schema_param: str | None = None

    @property
    def input_param(self) -> str:
        return "prompt" if self.messages is None else "messages"

    @property
    def forced_tool(self) -> bool:
        return self.tool_mode in (ToolMode.REQUIRED, ToolMode.NAMED)

    def template_tools(self) -> list[dict[str, Any]] | None:
        """Tool definitions shown to the chat template (none when tool_choice is none)."""
        if not self.tools or self.tool_mode == ToolMode.NONE:
            return None
        return [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                },
            }
            for t in self.tools
        ]


DEFAULT_LIMITS = Limits()


def validate(req: GenerateInput, limits: Limits = DEFAULT_LIMITS) -> Plan:
    """Check a request and return its plan, or raise InvalidArgument."""
    if req.prompt is None and req.messages is None:
        raise InvalidArgument("the request needs a prompt or messages", param="messages")
    messages = None
    if req.messages is not None:
        messages = validate_messages(req.messages)
        if req.echo:
            raise InvalidArgument("echo is only supported for completions, not chat", param="echo")
    elif req.tools_json or req.tool_choice:
        raise InvalidArgument("tools are only supported for chat", param="tools")
    elif req.chat_template:
        raise InvalidArgument("chat_template is only used for chat", param="chat_template")

    if req.max_prompt_tokens < 0:
        raise InvalidArgument(
            f"max_prompt_tokens must be 0 (no cap) or more, got {req.max_prompt_tokens}",
            param="max_prompt_tokens",
        )

    tools = parse_tools(req.tools_json) if messages is not None else []
    mode, name = parse_tool_choice(req.tool_choice, tools, limits)
    sampling = validate_sampling(req, limits)
    schema_param = "response_format" if sampling.json_schema is not None else None
    if mode in (ToolMode.REQUIRED, ToolMode.NAMED):
        if sampling.json_schema is not None or sampling.json_object:
            raise InvalidArgument(
                "response_format cannot be combined with a forced tool call "
                "(tool_choice 'required' or a function name)",
                param="response_format",
            )
        sampling.json_schema = toolcalls.forced_schema(tools, name)
        schema_param = "tools"
        check_schema_size(json.dumps(sampling.json_schema), schema_param, limits)
    return Plan(
        prompt=req.prompt if messages is None else None,
        messages=messages,
        chat_template=req.chat_template or None,
        tools=tools,
        tool_mode=mode,
        tool_name=name,
        max_tokens=req.sampling.max_tokens,
        sampling=sampling,
        echo=req.echo,
        max_prompt_tokens=req.max_prompt_tokens or limits.max_prompt_tokens,
        schema_param=schema_param,
    )


# ---------------------------------------------------------------- messages


def validate_messages(messages: list) -> list[dict[str, Any]]:
    if not messages:
        raise InvalidArgument("messages must contain at least one message", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        role = ROLE_ALIASES.get(m.role, m.role)
        if role not in ROLES:
            raise InvalidArgument(
                f"unknown role {m.role!r} in {param}: use one of {', '.join(ROLES)}",
                param=f"{param}.role",
            )
        d: dict[str, Any] = {"role": role, "content": m.content}
        if m.name:
            d["name"] = m.name
        if role == "tool":
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
        if m.tool_calls_json:
            if role != "assistant":
                raise InvalidArgument(
                    f"only assistant messages carry tool_calls ({param} is {role})",
                    param=f"{param}.tool_calls",
                )
            d["tool_calls"] = _parse_tool_calls(m.tool_calls_json, f"{param}.tool_calls")
        out.append(d)
    return out


def _parse_tool_calls(raw: str, param: str) -> list[dict[str, Any]]:
    try:
        calls = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(calls, list):
        raise InvalidArgument(f"{param} must be a JSON list of tool calls", param=param)
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidArgument(
                f"{param}[{j}] must look like "
                '{"id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}',
                param=f"{param}[{j}]",
            )
    return calls


# ---------------------------------------------------------------- tools


def parse_tools(raw: str) -> list[Tool]:
    if not raw:
        return []
    try:
        items = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"tools is not valid JSON: {exc}", param="tools") from None
    if not isinstance(items, list):
        raise InvalidArgument("tools must be a list of tool definitions", param="tools")
    tools: list[Tool] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        p = f"tools[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f"{p} must be an object", param=p)
        if item.get("type", "function") != "function":
            raise InvalidArgument(
                f"{p}.type is {item.get('type')!r}: only 'function' tools are supported",
                param=f"{p}.type",
            )
        fn = item.get("function")
        if not isinstance(fn, dict):
            raise InvalidArgument(f"{p}.function must be an object", param=f"{p}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise InvalidArgument(
                f"{p}.function.name must be 1-64 letters, digits, '_', '.' or '-'",
                param=f"{p}.function.name",
            )
        if name in seen:
            raise InvalidArgument(
                f"tool name {name!r} is defined twice", param=f"{p}.function.name"
            )
        seen.add(name)
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        check_json_schema(params, f"{p}.function.parameters")
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise InvalidArgument(
                f"{p}.function.description must be a string", param=f"{p}.function.description"
            )
        tools.append(Tool(name=name, description=desc, parameters=params))
    return tools


def parse_tool_choice(raw: str, tools: list[Tool], limits: Limits) -> tuple[str, str | None]:
    """(mode, function name). "" means OpenAI's default: auto with tools, none without."""
    choice = raw.strip()
    if choice.startswith("{"):
        # The OpenAI object form {"type": "function", "function": {"name": ...}}.
        try:
            obj = json.loads(choice)
            choice = obj["function"]["name"]
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument(
                "tool_choice must be none, auto, required, a function name or "
                '{"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            ) from None
        if choice in ("none", "auto", "required"):
            return _named(choice, tools)
    if not choice:
        choice = "auto" if tools else "none"
    if choice == "none":
        return ToolMode.NONE, None
    if not tools:
        raise InvalidArgument(
            f"tool_choice {choice!r} needs tools: the request defines none", param="tool_choice"
        )
    if choice == "auto":
        if not limits.auto_tools:
            raise InvalidArgument(
                f"tool_choice 'auto' is not supported by {limits.model}: it has no tool-call "
                "parser to tell a tool call from text. Use tool_choice 'required' or a function "
                "name (the output is then constrained to a valid call), or 'none'",
                param="tool_choice",
            )
        return ToolMode.AUTO, None
    if choice == "required":
        return ToolMode.REQUIRED, None
    return _named(choice, tools)


def _named(name: str, tools: list[Tool]) -> tuple[str, str]:
    if name not in {t.name for t in tools}:
        raise InvalidArgument(
            f"tool_choice names function {name!r}, which is not among the tools "
            f"({', '.join(t.name for t in tools)})",
            param="tool_choice",
        )
    return ToolMode.NAMED, name


# ---------------------------------------------------------------- sampling


def _number(value: float | None, param: str) -> None:
    if value is not None and not math.isfinite(value):
        raise InvalidArgument(f"{param} must be a finite number", param=param)


def validate_sampling(req: GenerateInput, limits: Limits) -> EngineSampling:
    s = req.sampling
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _number(getattr(s, name), name)
    if s.max_tokens is not None and s.max_tokens < 1:
        raise InvalidArgument(
            f"max_tokens must be at least 1, got {s.max_tokens}", param="max_tokens"
        )
    temperature = 1.0 if s.temperature is None else float(s.temperature)
    if not 0.0 <= temperature <= 2.0:
        raise InvalidArgument(
            f"temperature must be between 0 and 2, got {_fmt(temperature)}", param="temperature"
        )
    top_p = 1.0 if s.top_p is None else float(s.top_p)
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument(
            f"top_p must be greater than 0 and at most 1, got {_fmt(top_p)}", param="top_p"
        )
    top_k = 0 if s.top_k is None else int(s.top_k)
    if top_k < -1:
        raise InvalidArgument(
            f"top_k must be a positive number of tokens (0 or -1 to disable), got {top_k}",
            param="top_k",
        )
    n = 1 if s.n is None else int(s.n)
    if not 1 <= n <= limits.max_n:
        raise InvalidArgument(f"n must be between 1 and {limits.max_n}, got {n}", param="n")
    if len(s.stop) > limits.max_stop:
        raise InvalidArgument(
            f"stop takes at most {limits.max_stop} sequences, got {len(s.stop)}", param="stop"
        )
    if any(not x for x in s.stop):
        raise InvalidArgument("stop sequences must not be empty strings", param="stop")
    for name in ("presence_penalty", "frequency_penalty"):
        v = float(getattr(s, name))
        if not -2.0 <= v <= 2.0:
            raise InvalidArgument(f"{name} must be between -2 and 2, got {_fmt(v)}", param=name)
    if not 0 <= s.top_logprobs <= limits.max_top_logprobs:
        raise InvalidArgument(
            f"top_logprobs must be between 0 and {limits.max_top_logprobs}, got {s.top_logprobs}",
            param="top_logprobs",
        )
    if s.top_logprobs and not s.logprobs:
        raise InvalidArgument("top_logprobs needs logprobs set to true", param="top_logprobs")
    validate_logit_bias(s.logit_bias, limits)

    json_schema: dict[str, Any] | None = None
    json_object = False
    fmt = s.response_format
    if fmt == ResponseFormat.JSON_SCHEMA:
        if not s.json_schema:
            raise InvalidArgument(
                "response_format json_schema needs a schema", param="response_format.json_schema"
            )
        check_schema_size(s.json_schema, "response_format", limits)
        json_schema = parse_json_schema(s.json_schema, "response_format.json_schema")
    elif s.json_schema:
        raise InvalidArgument(
            "a JSON schema was sent but response_format is not json_schema",
            param="response_format.json_schema",
        )
    elif fmt == ResponseFormat.JSON_OBJECT:
        json_object = True

    return EngineSampling(
        max_tokens=s.max_tokens or 1,
        n=n,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        stop=list(s.stop),
        seed=s.seed,
        presence_penalty=float(s.presence_penalty),
        frequency_penalty=float(s.frequency_penalty),
        logprobs=s.top_logprobs if s.logprobs else None,
        json_schema=json_schema,
        json_object=json_object,
        logit_bias=dict(s.logit_bias) or None,
        ignore_eos=s.ignore_eos,
    )


def validate_logit_bias(bias: dict[int, float], limits: Limits) -> None:
    """Token ids and biases; whether an id is in the vocabulary is the engine's check."""
    if len(bias) > limits.max_logit_bias:
        raise InvalidArgument(
            f"logit_bias takes at most {limits.max_logit_bias} tokens, got {len(bias)}",
            param="logit_bias",
        )
    for token, value in bias.items():
        if token < 0:
            raise InvalidArgument(
                f"logit_bias keys must be token ids (0 or more), got {token}", param="logit_bias"
            )
        if not (math.isfinite(value) and -100.0 <= value <= 100.0):
            raise InvalidArgument(
                f"logit_bias values must be between -100 and 100, got {_fmt(value)} for "
                f"token {token}",
                param="logit_bias",
            )


def _fmt(v: float) -> str:
    return f"{v:g}"


# ---------------------------------------------------------------- JSON schema


def check_schema_size(text: str, param: str, limits: Limits) -> None:
    """Refuse a constrained-decoding schema too large to compile quickly (checked before it is
    even parsed: grammar compile time grows faster than the schema)."""
    size = len(text.encode())
    if size > limits.max_schema_bytes:
        raise InvalidArgument(
            f"the JSON schema in {param} is {size} bytes; this server accepts schemas of at "
            f"most {limits.max_schema_bytes} bytes for constrained decoding",
            param=param,
        )


def parse_json_schema(raw: str, param: str) -> dict[str, Any]:
    try:
        schema = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"{param} is not valid JSON: {exc}", param=param) from None
    check_json_schema(schema, param)
    return schema


def check_json_schema(schema: Any, param: str) -> None:
    """Raise InvalidArgument unless ``schema`` is a valid JSON schema object."""
    if not isinstance(schema, dict):
        raise InvalidArgument(f"{param} must be a JSON schema object", param=param)
    from jsonschema import exceptions, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        at = f" at {where}" if where else ""
        raise InvalidArgument(
            f"{param} is not a valid JSON schema{at}: {exc.message}", param=param
        ) from None


# ---------------------------------------------------------------- lengths


def resolve_max_tokens(
    prompt_tokens: int,
    requested: int | None,
    max_model_len: int,
    input_param: str,
    max_prompt_tokens: int = 0,
) -> int:
    """The number of tokens to generate, or InvalidArgument when the prompt is longer than its
    cap (``max_prompt_tokens``, 0 = none) or the request does not fit the context."""
    if 0 < max_prompt_tokens < prompt_tokens:
        raise InvalidArgument(
            f"the {input_param} is {prompt_tokens} tokens long, but this endpoint accepts "
            f"prompts of at most {max_prompt_tokens} tokens",
            param=input_param,
        )
    room = max_model_len - prompt_tokens
    if room < 1:
        raise InvalidArgument(
            f"the {input_param} is {prompt_tokens} tokens long, which leaves no room in the "
            f"model's context of {max_model_len} tokens",
            param=input_param,
        )
    if requested is None:
        return room
    if requested > room:
        raise InvalidArgument(
            f"max_tokens is {requested}, but the {input_param} already uses {prompt_tokens} of "
            f"the model's {max_model_len}-token context: at most {room} tokens can be generated",
            param="max_tokens",
        )
    return requested
