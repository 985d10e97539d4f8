"""OpenAI-shaped chat and completions: request parsing and response/stream rendering.

Shape checks live here (types, message structure, content parts), and the bounds on how many
generation streams one request opens (at most MAX_PROMPTS prompts and MAX_CHOICES choices,
prompts x n); range checks (temperature, top_p, n, logit_bias, context length, ...) live in the
generation service, which knows the model, and come back as INVALID_ARGUMENT naming the
parameter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from fmapi.generation.v1 import generation_pb2 as pb
from fmapi_common.errors import InvalidArgument

FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_ABORT: "stop",
}
# One completions request opens one generation stream per prompt: bound the fan-out.
MAX_PROMPTS = 64
MAX_CHOICES = 128  # prompts x n
MAX_USER_CHARS = 256
_TOKEN_ID = re.compile(r"[0-9]{1,10}")
_FORMATS = {
    "text": pb.RESPONSE_FORMAT_TYPE_TEXT,
    "json_object": pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    "json_schema": pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}


def _num(body: dict, key: str, kind=float, bits: int = 32):
    """A number from the body; integers must also fit the proto field (``bits``-bit signed)."""
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind is int:
        ok = ok and float(v).is_integer()
    if not ok:
        raise InvalidArgument(f"'{key}' must be {'an integer' if kind is int else 'a number'}", param=key)
    if kind is int and not -(2 ** (bits - 1)) <= int(v) < 2 ** (bits - 1):
        raise InvalidArgument(f"'{key}' is out of range", param=key)
    return kind(v)


def _bool(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise InvalidArgument(f"'{key}' must be true or false", param=key)
    return v


@dataclass
class GenerationCall:
    """A validated chat or completions call, ready for the generation service."""

    endpoint: str
    requests: list[pb.GenerateRequest]  # one per prompt (completions may batch prompts)
    stream: bool
    include_usage: bool
    n: int
    logprobs: bool
    chat: bool
    max_tokens_given: bool
    extras: dict[str, Any] = field(default_factory=dict)
    # OpenAI's end-user id, for logs and usage records (never sent to the model).
    user: str | None = None


def _merge_extra_params(body: dict) -> dict:
    """Databricks clients put provider-specific parameters under ``extra_params``."""
    extra = body.get("extra_params")
    if extra is None:
        return body
    if not isinstance(extra, dict):
        raise InvalidArgument("'extra_params' must be an object", param="extra_params")
    return {**extra, **{k: v for k, v in body.items() if k != "extra_params"}}


def _sampling(body: dict, default_max_tokens: int) -> tuple[pb.SamplingParams, bool]:
    s = pb.SamplingParams()
    max_tokens = _num(body, "max_tokens", int)
    if max_tokens is None:
        max_tokens = _num(body, "max_completion_tokens", int)
    if max_tokens is not None:
        s.max_tokens = max_tokens
    elif default_max_tokens > 0:
        s.max_tokens = default_max_tokens
    for key in ("temperature", "top_p"):
        v = _num(body, key)
        if v is not None:
            setattr(s, key, v)
    if (v := _num(body, "top_k", int)) is not None:
        s.top_k = v
    if (v := _num(body, "n", int)) is not None:
        s.n = v
    if (v := _num(body, "seed", int, bits=64)) is not None:
        s.seed = v
    for key in ("presence_penalty", "frequency_penalty"):
        if (v := _num(body, key)) is not None:
            setattr(s, key, v)
    _logit_bias(body, s)
    s.ignore_eos = _bool(body, "ignore_eos")
    stop = body.get("stop")
    if isinstance(stop, str):
        s.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop):
        s.stop.extend(stop)
    elif stop is not None:
        raise InvalidArgument("'stop' must be a string or a list of strings", param="stop")
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in _FORMATS:
            raise InvalidArgument(
                "'response_format' must be an object with type text, json_object or json_schema",
                param="response_format",
            )
        s.response_format = _FORMATS[rf["type"]]
        if rf["type"] == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise InvalidArgument(
                    "'response_format.json_schema.schema' must be a JSON schema object",
                    param="response_format",
                )
            s.json_schema = json.dumps(schema)
    return s, max_tokens is not None


def _logit_bias(body: dict, s: pb.SamplingParams) -> None:
    """Shape only ({"<token id>": number}); ranges and the vocabulary are the model's checks."""
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise InvalidArgument(
            "'logit_bias' must be an object mapping token ids (as strings) to numbers "
            "between -100 and 100",
            param="logit_bias",
        )
    for key, value in bias.items():
        if not _TOKEN_ID.fullmatch(key) or int(key) >= 2**31:
            raise InvalidArgument(f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InvalidArgument(
                f"'logit_bias' values must be numbers between -100 and 100, got {value!r} for token {key}",
                param="logit_bias",
            )
        s.logit_bias[int(key)] = float(value)


def _content_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidArgument(
                    f"messages[{i}].content[{j}] is a {kind!r} part; only text parts are supported",
                    param=f"messages[{i}].content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidArgument(
        f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content"
    )


def _messages(body: dict) -> list[pb.ChatMessage]:
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise InvalidArgument("'messages' is required and must be a list", param="messages")
    if not msgs:
        raise InvalidArgument("'messages' must not be empty", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str):
            raise InvalidArgument(f"messages[{i}].role is required", param=f"messages[{i}].role")
        msg = pb.ChatMessage(role=role, content=_content_text(m.get("content"), i))
        if isinstance(m.get("name"), str):
            msg.name = m["name"]
        if isinstance(m.get("tool_call_id"), str):
            msg.tool_call_id = m["tool_call_id"]
        if m.get("tool_calls") is not None:
            msg.tool_calls_json = json.dumps(m["tool_calls"])
        out.append(msg)
    return out


def parse_chat(body: dict, endpoint: str | None, default_max_tokens: int = 0) -> GenerationCall:
    body = _merge_extra_params(body)
    name = _endpoint_name(body, endpoint)
    sampling, given = _sampling(body, default_max_tokens)
    _logprobs(body, sampling)
    chat = pb.Chat(messages=_messages(body))
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidArgument("'tools' must be a list of tool definitions", param="tools")
        chat.tools_json = json.dumps(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        if isinstance(choice, str):
            chat.tool_choice = choice
        elif isinstance(choice, dict):
            chat.tool_choice = json.dumps(choice)
        else:
            raise InvalidArgument("'tool_choice' must be a string or an object", param="tool_choice")
    req = pb.GenerateRequest(chat=chat, sampling=sampling)
    return _call(body, name, [req], chat=True, max_tokens_given=given)


def parse_completion(body: dict, endpoint: str | None, default_max_tokens: int = 0) -> GenerationCall:
    body = _merge_extra_params(body)
    name = _endpoint_name(body, endpoint)
    sampling, given = _sampling(body, default_max_tokens)
    lp = _num(body, "logprobs", int)
    if lp is not None:
        sampling.logprobs = True
        sampling.top_logprobs = lp
    if body.get("suffix") is not None:
        raise InvalidArgument("'suffix' is not supported by this server", param="suffix")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise InvalidArgument("token-id prompts are not supported; send text", param="prompt")
    else:
        raise InvalidArgument("'prompt' is required: a string or a non-empty list of strings", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidArgument(
            f"'prompt' holds {len(prompts)} prompts; a request may send at most {MAX_PROMPTS} "
            f"(and ask for at most {MAX_CHOICES} choices in all, prompts x n)",
            param="prompt",
        )
    echo = _bool(body, "echo")
    reqs = [pb.GenerateRequest(prompt=p, sampling=sampling, echo=echo) for p in prompts]
    return _call(body, name, reqs, chat=False, max_tokens_given=given)


def _endpoint_name(body: dict, endpoint: str | None) -> str:
    if endpoint is not None:
        return endpoint
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("'model' is required and must name an endpoint", param="model")
    return model


def _logprobs(body: dict, s: pb.SamplingParams) -> None:
    s.logprobs = _bool(body, "logprobs")
    top = _num(body, "top_logprobs", int)
    if top is not None:
        if not s.logprobs:
            raise InvalidArgument("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        s.top_logprobs = top


def _call(body, name, reqs, *, chat: bool, max_tokens_given: bool) -> GenerationCall:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise InvalidArgument("'stream_options' must be an object", param="stream_options")
        if not stream:
            raise InvalidArgument("'stream_options' is only allowed with 'stream': true", param="stream_options")
        include_usage = bool(opts.get("include_usage"))
    s = reqs[0].sampling
    n = s.n if s.HasField("n") else 1
    if len(reqs) * n > MAX_CHOICES:
        raise InvalidArgument(
            f"{len(reqs)} prompts x n={n} asks for {len(reqs) * n} choices; a request may ask for "
            f"at most {MAX_CHOICES} choices in all (and send at most {MAX_PROMPTS} prompts)",
            param="prompt" if not chat else "n",
        )
    best_of = _num(body, "best_of", int)
    if best_of is not None and best_of != n:
        raise InvalidArgument(
            f"'best_of' is not supported (the engine has no best_of): leave it out, or send the "
            f"same value as 'n' ({n})",
            param="best_of",
        )
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS):
        raise InvalidArgument(
            f"'user' must be a string of at most {MAX_USER_CHARS} characters", param="user"
        )
    return GenerationCall(
        endpoint=name,
        requests=reqs,
        stream=stream,
        include_usage=include_usage,
        n=n,
        logprobs=s.logprobs,
        chat=chat,
        max_tokens_given=max_tokens_given,
        user=user,
    )


# ---------------------------------------------------------------------------- rendering


def chat_logprobs(deltas: list[pb.TokenLogprob]) -> dict:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.token.encode()),
                "top_logprobs": [
                    {"token": a.token, "logprob": a.logprob, "bytes": list(a.token.encode())}
                    for a in t.top_logprobs
                ],
            }
            for t in deltas
        ]
    }


def completion_logprobs(deltas: list[pb.TokenLogprob], offset: int) -> dict:
    offsets, pos = [], offset
    for t in deltas:
        offsets.append(pos)
        pos += len(t.token)
    return {
        "tokens": [t.token for t in deltas],
        "token_logprobs": [t.logprob for t in deltas],
        "top_logprobs": [{a.token: a.logprob for a in t.top_logprobs} for t in deltas],
        "text_offset": offsets,
    }


def tool_calls(delta: pb.ChoiceDelta, streaming: bool) -> list[dict] | None:
    if not delta.tool_calls_json:
        return None
    calls = json.loads(delta.tool_calls_json)
    if streaming:
        return [{"index": i, **c} for i, c in enumerate(calls)]
    return calls


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
