"""The OpenAPI document of one serving endpoint, as Databricks serves it at
``GET /api/2.0/serving-endpoints/{name}/openapi``: OpenAPI 3.1.0, one path
(``/{name}/invocations`` under the ``/serving-endpoints`` server), the request and response
shapes of the endpoint's task, bearer-token security, and the error body every failure carries.

The request schemas document what :mod:`.openai_generation`, :mod:`.openai_embeddings` and
:class:`.quota.UsageTags` read from a body, no more and no less; where the parser accepts more
shapes than a client should rely on, the schema states the narrower contract. Range checks that
depend on the model (context length, temperature bounds, ...) are the model server's and are
not repeated here.
"""

from __future__ import annotations

import copy

from .openai_generation import MAX_PROMPTS, MAX_USER_CHARS

CHAT = "llm/v1/chat"
COMPLETIONS = "llm/v1/completions"
EMBEDDINGS = "llm/v1/embeddings"
TASKS = (CHAT, COMPLETIONS, EMBEDDINGS)

_INT32_MAX = 2**31 - 1
_REF = "#/components/schemas/"


def _ref(name: str) -> dict:
    return {"$ref": _REF + name}


# ---------------------------------------------------------------- shared pieces

_ERROR = {
    "type": "object",
    "description": "Every error: Databricks' error_code and message, and the same failure in "
    "OpenAI's shape under 'error'.",
    "required": ["error_code", "message"],
    "properties": {
        "error_code": {
            "type": "string",
            "description": "INVALID_PARAMETER_VALUE, UNAUTHENTICATED, PERMISSION_DENIED, "
            "RESOURCE_DOES_NOT_EXIST, REQUEST_LIMIT_EXCEEDED, TEMPORARILY_UNAVAILABLE, ...",
        },
        "message": {"type": "string"},
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        },
    },
}

_ERRORS = {
    "400": "The request is malformed or a parameter is out of range.",
    "401": "No token, or the token is unknown, expired or revoked.",
    "403": "The token may not query this endpoint.",
    "404": "The endpoint does not exist.",
    "413": "The request body is too large.",
    "429": "A rate limit of the endpoint was reached; retry after Retry-After seconds.",
    "500": "An internal error.",
    "503": "No model server is ready for the endpoint, or a dependency is down; retry.",
    "504": "The model took too long to answer.",
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 1},
    },
    "Retry-After-Ms": {
        "description": "Milliseconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 0},
    },
}

# Read from every invocation body for the usage record (quota.UsageTags.from_body).
_USAGE_TAGS = {
    "client_request_id": {
        "type": "string",
        "maxLength": 128,
        "description": "Your id for the request, kept in its usage record.",
    },
    "usage_context": {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": "Flat key/value pairs kept in the request's usage record.",
    },
}

_MODEL = {
    "type": "string",
    "description": "Ignored on this path: the URL names the endpoint.",
}

# ---------------------------------------------------------------- chat and completions

_STOP = {
    "description": "Stop generating at any of these strings.",
    "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
}

_RESPONSE_FORMAT = {
    "description": "Constrain the output: free text, any JSON object, or JSON matching a schema.",
    "oneOf": [
        {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": ["text", "json_object"]}},
        },
        {
            "type": "object",
            "required": ["type", "json_schema"],
            "properties": {
                "type": {"const": "json_schema"},
                "json_schema": {
                    "type": "object",
                    "required": ["schema"],
                    "properties": {
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                        "schema": {"type": "object", "description": "A JSON schema."},
                        "strict": {"type": "boolean"},
                    },
                },
            },
        },
    ],
}

# What both chat and completions read (openai_generation._sampling and _call).
_GENERATION_PARAMS = {
    "model": _MODEL,
    "max_tokens": {
        "type": "integer",
        "format": "int32",
        "description": "Most tokens to generate (default: the endpoint's default, else the "
        "room left in the context).",
    },
    "max_completion_tokens": {
        "type": "integer",
        "format": "int32",
        "description": "Same as max_tokens, used when max_tokens is absent.",
    },
    "temperature": {"type": "number", "description": "Sampling temperature (0: greedy)."},
    "top_p": {"type": "number", "description": "Nucleus sampling probability mass."},
    "top_k": {"type": "integer", "format": "int32", "description": "Sample from the k likeliest."},
    "n": {"type": "integer", "format": "int32", "description": "Choices to generate (default 1)."},
    "best_of": {
        "type": "integer",
        "format": "int32",
        "description": "Not supported beyond its default: leave it out or send the value of n.",
    },
    "seed": {"type": "integer", "format": "int64", "description": "Seed for sampling."},
    "presence_penalty": {"type": "number"},
    "frequency_penalty": {"type": "number"},
    "logit_bias": {
        "type": "object",
        "description": "Token id (as a string) -> bias between -100 and 100.",
        "propertyNames": {"pattern": "^[0-9]{1,10}$"},
        "additionalProperties": {"type": "number"},
    },
    "ignore_eos": {
        "type": "boolean",
        "description": "Keep generating past the end-of-sequence token (up to max_tokens).",
    },
    "stop": _STOP,
    "response_format": _RESPONSE_FORMAT,
    "stream": {
        "type": "boolean",
        "description": "Answer with server-sent events (text/event-stream), ending with "
        "'data: [DONE]'.",
    },
    "stream_options": {
        "type": "object",
        "description": "Only with stream: true.",
        "properties": {
            "include_usage": {
                "type": "boolean",
                "description": "Send a last chunk with the usage totals before [DONE].",
            }
        },
    },
    "user": {
        "type": "string",
        "maxLength": MAX_USER_CHARS,
        "description": "The end user's id, for logs and usage records.",
    },
    "extra_params": {
        "type": "object",
        "description": "More parameters, merged into the body (top-level parameters win).",
    },
}

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}

_CHAT_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {
            "type": "string",
            "description": "system, user, assistant or tool (the model's chat template decides "
            "which roles it takes).",
        },
        "content": {
            "description": "Text, or a list of text parts (joined); null for an assistant "
            "message that only calls tools.",
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": _ref("TextContentPart")},
                {"type": "null"},
            ],
        },
        "name": {"type": "string"},
        "tool_call_id": {
            "type": "string",
            "description": "On a tool message: the call it answers.",
        },
        "tool_calls": {"type": "array", "items": _ref("ToolCall")},
    },
}

_TOOL_CALL = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {
                "name": {"type": "string"},
                "arguments": {"type": "string", "description": "JSON-encoded arguments."},
            },
        },
    },
}

_TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "description": {"type": "string"},
                "parameters": {"type": "object", "description": "A JSON schema."},
                "strict": {"type": "boolean"},
            },
        },
    },
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
        "tools": {"type": "array", "items": _ref("Tool")},
        "tool_choice": {
            "oneOf": [
                {"type": "string", "enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "required": ["type", "function"],
                    "properties": {
                        "type": {"const": "function"},
                        "function": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}},
                        },
                    },
                },
            ]
        },
        "logprobs": {"type": "boolean", "description": "Return the chosen tokens' logprobs."},
        "top_logprobs": {
            "type": "integer",
            "format": "int32",
            "description": "Alternatives per token to return; needs logprobs: true.",
        },
        **_GENERATION_PARAMS,
        **_USAGE_TAGS,
    },
}

_COMPLETION_REQUEST = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "description": f"A prompt, or up to {MAX_PROMPTS} prompts (choices are numbered "
            "prompt by prompt, n per prompt).",
            "oneOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_PROMPTS,
                    "items": {"type": "string"},
                },
            ],
        },
        "echo": {"type": "boolean", "description": "Put the prompt in front of the text."},
        "logprobs": {
            "type": "integer",
            "format": "int32",
            "description": "Return the chosen tokens' logprobs and this many alternatives.",
        },
        "suffix": {"type": "null", "description": "Not supported: leave it out."},
        **_GENERATION_PARAMS,
        **_USAGE_TAGS,
    },
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}

_FINISH = {"enum": ["stop", "length", "tool_calls", None]}

_TOP_LOGPROB = {
    "type": "object",
    "required": ["token", "logprob"],
    "properties": {
        "token": {"type": "string"},
        "logprob": {"type": "number"},
        "bytes": {"type": "array", "items": {"type": "integer"}},
    },
}

_CHAT_LOGPROBS = {
    "type": ["object", "null"],
    "properties": {
        "content": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["token", "logprob", "top_logprobs"],
                "properties": {
                    **_TOP_LOGPROB["properties"],
                    "top_logprobs": {"type": "array", "items": _TOP_LOGPROB},
                },
            },
        }
    },
}

_COMPLETION_LOGPROBS = {
    "type": ["object", "null"],
    "properties": {
        "tokens": {"type": "array", "items": {"type": "string"}},
        "token_logprobs": {"type": "array", "items": {"type": "number"}},
        "top_logprobs": {
            "type": "array",
            "items": {"type": "object", "additionalProperties": {"type": "number"}},
        },
        "text_offset": {"type": "array", "items": {"type": "integer"}},
    },
}


def _answer(obj: str, choice: dict, chunk: bool = False) -> dict:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"] + ([] if chunk else ["usage"]),
        "properties": {
            "id": {"type": "string"},
            "object": {"const": obj},
            "created": {"type": "integer", "description": "Unix time in seconds."},
            "model": {"type": "string", "description": "The endpoint's name."},
            "choices": {"type": "array", "items": choice},
            "usage": _ref("Usage")
            if not chunk
            else {
                "description": "With stream_options.include_usage: null on every chunk but the "
                "last, which has no choices.",
                "oneOf": [_ref("Usage"), {"type": "null"}],
            },
        },
    }


_CHAT_RESPONSE = _answer(
    "chat.completion",
    {
        "type": "object",
        "required": ["index", "message", "finish_reason"],
        "properties": {
            "index": {"type": "integer"},
            "message": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"const": "assistant"},
                    "content": {"type": ["string", "null"]},
                    "tool_calls": {"type": "array", "items": _ref("ToolCall")},
                },
            },
            "logprobs": _ref("ChatLogprobs"),
            "finish_reason": _FINISH,
        },
    },
)

_CHAT_CHUNK = _answer(
    "chat.completion.chunk",
    {
        "type": "object",
        "required": ["index", "delta"],
        "properties": {
            "index": {"type": "integer"},
            "delta": {
                "type": "object",
                "properties": {
                    "role": {"const": "assistant"},
                    "content": {"type": "string"},
                    "tool_calls": {"type": "array", "items": {"type": "object"}},
                },
            },
            "logprobs": _ref("ChatLogprobs"),
            "finish_reason": _FINISH,
        },
    },
    chunk=True,
)

_COMPLETION_CHOICE = {
    "type": "object",
    "required": ["index", "text", "finish_reason"],
    "properties": {
        "index": {"type": "integer"},
        "text": {"type": "string"},
        "logprobs": _ref("CompletionLogprobs"),
        "finish_reason": _FINISH,
    },
}
_COMPLETION_RESPONSE = _answer("text_completion", _COMPLETION_CHOICE)
_COMPLETION_CHUNK = _answer("text_completion", _COMPLETION_CHOICE, chunk=True)

# ---------------------------------------------------------------- embeddings

_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0,
                                                        "maximum": _INT32_MAX}}

_EMBEDDINGS_REQUEST = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "input": {
            "description": "A text, a list of texts, a list of token ids, or a list of "
            "token-id lists; one embedding per text or token list.",
            "oneOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "items": {"type": "string"}},
                _TOKEN_IDS,
                {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
            ],
        },
        "dimensions": {
            "type": "integer",
            "minimum": 1,
            "maximum": _INT32_MAX,
            "description": "Truncate the embeddings to this many dimensions (models that "
            "support it).",
        },
        "encoding_format": {
            "enum": ["float", "base64"],
            "default": "float",
            "description": "base64: each embedding as little-endian float32 bytes.",
        },
        "instruction": {
            "type": "string",
            "description": "Instruction for instruction-tuned embedding models.",
        },
        "model": _MODEL,
        **_USAGE_TAGS,
    },
}

_EMBEDDINGS_RESPONSE = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer"},
                    "embedding": {
                        "oneOf": [
                            {"type": "array", "items": {"type": "number"}},
                            {"type": "string", "contentEncoding": "base64"},
                        ]
                    },
                },
            },
        },
        "model": {"type": "string", "description": "The endpoint's name."},
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "total_tokens"],
            "properties": {
                "prompt_tokens": {"type": "integer"},
                "total_tokens": {"type": "integer"},
            },
        },
    },
}

# ---------------------------------------------------------------- per task

_STREAM_NOTE = (
    "With stream: true, text/event-stream: one 'data: {json}' event per {chunk} object, then "
    "'data: [DONE]'. An error after the stream began comes as one event holding the Error body."
)

# task: (request, response, stream chunk or None, the schemas they reference)
_TASKS: dict[str, tuple[str, str, str | None, dict]] = {
    CHAT: (
        "ChatCompletionRequest",
        "ChatCompletion",
        "ChatCompletionChunk",
        {
            "ChatCompletionRequest": _CHAT_REQUEST,
            "ChatMessage": _CHAT_MESSAGE,
            "TextContentPart": _TEXT_PART,
            "Tool": _TOOL,
            "ToolCall": _TOOL_CALL,
            "ChatCompletion": _CHAT_RESPONSE,
            "ChatCompletionChunk": _CHAT_CHUNK,
            "ChatLogprobs": _CHAT_LOGPROBS,
            "Usage": _USAGE,
        },
    ),
    COMPLETIONS: (
        "CompletionRequest",
        "Completion",
        "CompletionChunk",
        {
            "CompletionRequest": _COMPLETION_REQUEST,
            "Completion": _COMPLETION_RESPONSE,
            "CompletionChunk": _COMPLETION_CHUNK,
            "CompletionLogprobs": _COMPLETION_LOGPROBS,
            "Usage": _USAGE,
        },
    ),
    EMBEDDINGS: (
        "EmbeddingsRequest",
        "EmbeddingsResponse",
        None,
        {"EmbeddingsRequest": _EMBEDDINGS_REQUEST, "EmbeddingsResponse": _EMBEDDINGS_RESPONSE},
    ),
}


def endpoint_openapi(name: str, task: str, description: str = "") -> dict:
    """The OpenAPI 3.1.0 document for invoking endpoint ``name`` (a fresh dict each call)."""
    if task not in _TASKS:
        raise ValueError(f"no OpenAPI document for task {task!r}; expected one of {TASKS}")
    request, response, chunk, schemas = _TASKS[task]
    ok: dict = {
        "description": "The answer.",
        "content": {"application/json": {"schema": _ref(response)}},
    }
    if chunk is not None:
        ok["description"] = "The answer. " + _STREAM_NOTE.replace("{chunk}", chunk)
        ok["content"]["text/event-stream"] = {
            "schema": {"type": "string", "description": f"Server-sent {chunk} events."}
        }
    responses: dict = {"200": ok}
    for status, why in _ERRORS.items():
        responses[status] = {
            "description": why,
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        if status in ("429", "503"):
            responses[status]["headers"] = _RETRY_AFTER
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": name,
            "version": "1",
            "description": description or f"fmapi serving endpoint '{name}' ({task}).",
        },
        "servers": [{"url": "/serving-endpoints"}],
        "security": [{"bearerAuth": []}],
        "paths": {
            f"/{name}/invocations": {
                "post": {
                    "operationId": "invoke",
                    "summary": f"Query {name}",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref(request)}},
                    },
                    "responses": responses,
                }
            }
        },
        "components": {
            "schemas": {**schemas, "Error": _ERROR},
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An fmapi API token (fmapi_...).",
                }
            },
        },
    }
    return copy.deepcopy(doc)
