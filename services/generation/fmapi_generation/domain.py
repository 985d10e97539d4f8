"""The generation service's own request and output types (no proto, no vLLM).

The servicer turns protos into these; validation checks them; the service runs them on an
:class:`~fmapi_generation.engine.Engine` and yields :class:`Step` objects back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ResponseFormat(StrEnum):
    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    ABORT = "abort"
    # The engine gave up on the request (e.g. its output grammar reached a dead end): never
    # shown to callers as a finish reason; the service turns it into an error.
    ERROR = "error"


@dataclass
class Message:
    role: str
    content: str = ""
    name: str = ""
    tool_call_id: str = ""
    # JSON list of OpenAI tool calls an assistant made ("" when none).
    tool_calls_json: str = ""


@dataclass
class Sampling:
    """Decoding settings as the caller sent them (None = not sent)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: ResponseFormat = ResponseFormat.TEXT
    json_schema: str = ""
    # Token id -> bias added to its logit.
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False


@dataclass
class GenerateInput:
    """One prompt (completions) or one chat, plus sampling."""

    request_id: str = ""
    prompt: str | None = None
    messages: list[Message] | None = None
    # Chat only: template override, tools (JSON list of OpenAI tool definitions), tool_choice.
    chat_template: str = ""
    tools_json: str = ""
    tool_choice: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    echo: bool = False
    # Longest prompt accepted, in tokens (the endpoint's cap); 0 = the service's default.
    max_prompt_tokens: int = 0
    # Seconds without output after which a keep-alive step is sent (0 = never): see
    # GenerateRequest.keepalive_ms.
    keepalive_s: float = 0.0


# ---------------------------------------------------------------- what the engine is asked


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass
class EngineSampling:
    """Validated, defaulted sampling settings handed to the engine."""

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None = no logprobs; k >= 0 = the sampled token's logprob plus the k most likely.
    logprobs: int | None = None
    # Constrained decoding: a JSON schema (dict), or any JSON object.
    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    logit_bias: dict[int, float] | None = None
    ignore_eos: bool = False


# ---------------------------------------------------------------- what comes back


@dataclass
class TopLogprob:
    token: str
    logprob: float


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class ChoiceStep:
    """New output of one choice, as the engine produced it."""

    index: int
    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # Set on the final step of a tool-call choice: OpenAI-shaped tool calls.
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Step:
    choices: list[ChoiceStep]
    usage: Usage | None = None
    # On the first step of an admitted request: (the quota service's answer, input tokens,
    # output tokens reserved).
    admission: tuple[Any, int, int] | None = None
