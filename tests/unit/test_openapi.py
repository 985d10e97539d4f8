"""The per-endpoint OpenAPI document: a valid OpenAPI 3.1 document whose request schemas say what
the gateway's parsers read, no more and no less, and accept only bodies the parsers accept.

``openapi_spec_validator`` is not installed in the venv, so the document is checked with
``jsonschema``: its OpenAPI structure against the subset of the 3.1 specification it uses, every
schema as JSON Schema 2020-12 (the dialect of OpenAPI 3.1), and every ``$ref`` resolving.
"""

from __future__ import annotations

import ast
import inspect
import json

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from fmapi_common.errors import InvalidArgument
from fmapi_gateway import openai_embeddings, openai_generation, quota
from fmapi_gateway.openapi import endpoint_openapi

TASKS = ("llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings")
REQUEST = {
    "llm/v1/chat": "ChatCompletionRequest",
    "llm/v1/completions": "CompletionRequest",
    "llm/v1/embeddings": "EmbeddingsRequest",
}

# The part of the OpenAPI 3.1 specification this document uses, as a JSON schema.
_MEDIA = {
    "type": "object",
    "required": ["schema"],
    "properties": {"schema": {"type": "object"}},
}
_CONTENT = {
    "type": "object",
    "minProperties": 1,
    "propertyNames": {"pattern": r"^[a-z]+/[a-z0-9.+-]+$"},
    "additionalProperties": _MEDIA,
}
_RESPONSE = {
    "type": "object",
    "required": ["description"],
    "additionalProperties": False,
    "properties": {
        "description": {"type": "string"},
        "content": _CONTENT,
        "headers": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["schema"],
                "properties": {"description": {"type": "string"}, "schema": {"type": "object"}},
                "additionalProperties": False,
            },
        },
    },
}
_OPERATION = {
    "type": "object",
    "required": ["responses"],
    "additionalProperties": False,
    "properties": {
        "operationId": {"type": "string"},
        "summary": {"type": "string"},
        "description": {"type": "string"},
        "requestBody": {
            "type": "object",
            "required": ["content"],
            "additionalProperties": False,
            "properties": {"required": {"type": "boolean"}, "content": _CONTENT},
        },
        "responses": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": "^[1-5][0-9]{2}$"},
            "additionalProperties": _RESPONSE,
        },
        "security": {"type": "array"},
    },
}
OPENAPI_3_1_SUBSET = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["openapi", "info", "paths"],
    "additionalProperties": False,
    "properties": {
        "openapi": {"type": "string", "pattern": r"^3\.1\.\d+$"},
        "info": {
            "type": "object",
            "required": ["title", "version"],
            "additionalProperties": False,
            "properties": {
                "title": {"type": "string", "minLength": 1},
                "version": {"type": "string"},
                "description": {"type": "string"},
            },
        },
        "servers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["url"],
                "additionalProperties": False,
                "properties": {"url": {"type": "string"}, "description": {"type": "string"}},
            },
        },
        "security": {
            "type": "array",
            "items": {"type": "object", "additionalProperties": {"type": "array"}},
        },
        "paths": {
            "type": "object",
            "propertyNames": {"pattern": "^/"},
            "additionalProperties": {
                "type": "object",
                "propertyNames": {"enum": ["get", "put", "post", "delete", "patch"]},
                "additionalProperties": _OPERATION,
            },
        },
        "components": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "schemas": {
                    "type": "object",
                    "propertyNames": {"pattern": r"^[a-zA-Z0-9._-]+$"},
                    "additionalProperties": {"type": "object"},
                },
                "securitySchemes": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["type", "scheme"],
                        "properties": {
                            "type": {"const": "http"},
                            "scheme": {"type": "string"},
                            "description": {"type": "string"},
                        },
                    },
                },
            },
        },
    },
}


def _walk(value):
    yield value
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


def _schemas(doc: dict):
    """Every schema object the document holds (components, media types, headers)."""
    yield from doc["components"]["schemas"].values()
    for node in _walk(doc["paths"]):
        if isinstance(node, dict) and isinstance(node.get("schema"), dict):
            yield node["schema"]


@pytest.mark.parametrize("task", TASKS)
def test_document_is_valid_openapi_3_1(task):
    doc = endpoint_openapi("my-endpoint", task, "what it does")
    json.dumps(doc)  # served as JSON
    Draft202012Validator(OPENAPI_3_1_SUBSET).validate(doc)
    for schema in _schemas(doc):
        Draft202012Validator.check_schema(schema)
    # Every $ref points at a schema the document defines, and every defined schema is used.
    refs = {n["$ref"] for n in _walk(doc) if isinstance(n, dict) and "$ref" in n}
    defined = {f"#/components/schemas/{k}" for k in doc["components"]["schemas"]}
    assert refs <= defined
    used = set(refs)
    for name, schema in doc["components"]["schemas"].items():
        if name.endswith("Chunk"):  # stream events, named in the 200 description
            used.add(f"#/components/schemas/{name}")
            assert name in doc["paths"]["/my-endpoint/invocations"]["post"]["responses"]["200"][
                "description"]
    assert used == defined


@pytest.mark.parametrize("task", TASKS)
def test_document_names_the_endpoint_and_needs_a_bearer_token(task):
    doc = endpoint_openapi("chat-a_1", task)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "chat-a_1" and doc["info"]["version"] == "1"
    assert "chat-a_1" in doc["info"]["description"]
    assert doc["servers"] == [{"url": "/serving-endpoints"}]
    assert list(doc["paths"]) == ["/chat-a_1/invocations"]
    assert list(doc["paths"]["/chat-a_1/invocations"]) == ["post"]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "An fmapi API token (fmapi_...)."}
    assert doc["security"] == [{"bearerAuth": []}]


def test_description_is_used():
    doc = endpoint_openapi("e", "llm/v1/chat", "Gemma 3 270M")
    assert doc["info"]["description"] == "Gemma 3 270M"


@pytest.mark.parametrize("task", TASKS)
def test_error_responses_share_the_error_schema(task):
    doc = endpoint_openapi("e", task)
    responses = doc["paths"]["/e/invocations"]["post"]["responses"]
    for status in ("400", "401", "403", "404", "429", "503"):
        assert responses[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"}
    assert "Retry-After" in responses["429"]["headers"]
    error = doc["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"error_code", "message"}
    assert error["properties"]["error_code"]["type"] == "string"
    assert error["properties"]["message"]["type"] == "string"


def test_error_schema_matches_the_gateways_error_bodies():
    from fmapi_common.errors import ResourceExhausted, to_http

    error = endpoint_openapi("e", "llm/v1/chat")["components"]["schemas"]["Error"]
    body = to_http(ResourceExhausted("slow down", param="x")).body
    Draft202012Validator(error).validate(body)


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="llm/v1/rerank"):
        endpoint_openapi("e", "llm/v1/rerank")


def test_documents_do_not_share_state():
    a = endpoint_openapi("a", "llm/v1/chat")
    a["components"]["schemas"]["ChatCompletionRequest"]["properties"].clear()
    b = endpoint_openapi("b", "llm/v1/chat")
    assert "messages" in b["components"]["schemas"]["ChatCompletionRequest"]["properties"]


# ---------------------------------------------------------------- what the parsers read


def _body_keys(module, entry: str) -> set[str]:
    """Top-level body keys read by ``entry`` and the module functions it calls.

    The parser modules keep no list of the parameters they accept, so the list is read from
    their code: ``body.get("k")``, ``body["k"]``, ``helper(body, "k")`` and
    ``for key in ("a", "b"): helper(body, key)``.
    """
    tree = ast.parse(inspect.getsource(module))
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    keys: set[str] = set()
    seen: set[str] = set()
    todo = [entry]

    def is_body(node) -> bool:
        return isinstance(node, ast.Name) and node.id == "body"

    def text(node) -> str | None:
        is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
        return node.value if is_text else None

    while todo:
        name = todo.pop()
        if name in seen or name not in funcs:
            continue
        seen.add(name)
        for node in ast.walk(funcs[name]):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name):
                    todo.append(f.id)
                if isinstance(f, ast.Attribute) and f.attr == "get" and is_body(f.value):
                    keys.add(text(node.args[0]))
                elif len(node.args) >= 2 and is_body(node.args[0]) and text(node.args[1]):
                    keys.add(text(node.args[1]))
            elif isinstance(node, ast.Subscript) and is_body(node.value) and text(node.slice):
                keys.add(text(node.slice))
            elif (isinstance(node, ast.For) and isinstance(node.iter, (ast.Tuple, ast.List))
                  and any(is_body(n) for n in ast.walk(node))):
                keys.update(text(e) for e in node.iter.elts)
    keys.discard(None)
    return keys


USAGE_TAGS = _body_keys(quota, "from_body")
PARSED = {
    "llm/v1/chat": _body_keys(openai_generation, "parse_chat") | USAGE_TAGS,
    "llm/v1/completions": _body_keys(openai_generation, "parse_completion") | USAGE_TAGS,
    "llm/v1/embeddings": _body_keys(openai_embeddings, "parse_request") | USAGE_TAGS,
}


def test_the_parser_scan_finds_what_it_should():
    # Guards the scan itself: if these go missing, the code changed shape, not the parameters.
    assert USAGE_TAGS == {"client_request_id", "usage_context"}
    assert {"messages", "temperature", "top_p", "stop", "tools", "stream", "logprobs",
            "top_logprobs", "extra_params", "user"} <= PARSED["llm/v1/chat"]
    assert {"prompt", "echo", "suffix", "max_tokens", "n"} <= PARSED["llm/v1/completions"]
    assert "messages" not in PARSED["llm/v1/completions"]
    assert PARSED["llm/v1/embeddings"] == {"input", "model", "encoding_format", "dimensions",
                                           "instruction", "client_request_id", "usage_context"}


@pytest.mark.parametrize("task", TASKS)
def test_request_schema_lists_exactly_what_the_parser_reads(task):
    schema = endpoint_openapi("e", task)["components"]["schemas"][REQUEST[task]]
    assert set(schema["properties"]) == PARSED[task]


@pytest.mark.parametrize("task, field", [("llm/v1/chat", "messages"),
                                          ("llm/v1/completions", "prompt"),
                                          ("llm/v1/embeddings", "input")])
def test_required_fields(task, field):
    doc = endpoint_openapi("e", task)
    body = doc["paths"]["/e/invocations"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {
        "$ref": f"#/components/schemas/{REQUEST[task]}"}
    assert doc["components"]["schemas"][REQUEST[task]]["required"] == [field]


# ---------------------------------------------------------------- bodies: schema vs parser


def _validator(task: str, schema: str | None = None) -> Draft202012Validator:
    doc = endpoint_openapi("e", task)
    root = {"$ref": f"#/components/schemas/{schema or REQUEST[task]}",
            "components": doc["components"]}
    return Draft202012Validator(root)


def _parse(task: str, body: dict):
    if task == "llm/v1/embeddings":
        result = openai_embeddings.parse_request(body, "e")
    elif task == "llm/v1/chat":
        result = openai_generation.parse_chat(body, "e")
    else:
        result = openai_generation.parse_completion(body, "e")
    quota.UsageTags.from_body("r1", body)
    return result


TAGS = {"client_request_id": "abc", "usage_context": {"team": "ml"}}
VALID = [
    ("llm/v1/chat", {"messages": [{"role": "user", "content": "hi"}]}),
    ("llm/v1/chat", {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}], "name": "bob"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
        "model": "ignored", "max_tokens": 5, "max_completion_tokens": 6, "temperature": 0.5,
        "top_p": 0.9, "top_k": 3, "n": 2, "best_of": 2, "seed": 2**40, "stop": ["x", "y"],
        "presence_penalty": 0.1, "frequency_penalty": 0.2, "logit_bias": {"17": -100},
        "ignore_eos": False, "stream": True, "stream_options": {"include_usage": True},
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "object"}}},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "logprobs": True, "top_logprobs": 2, "user": "u1", "extra_params": {"top_k": 5},
        **TAGS,
    }),
    ("llm/v1/chat", {"messages": [{"role": "user", "content": "hi"}], "stop": "x",
                     "response_format": {"type": "json_object"}, "tool_choice": "auto"}),
    ("llm/v1/completions", {"prompt": "once upon"}),
    ("llm/v1/completions", {"prompt": ["a", "b"], "echo": True, "logprobs": 3, "n": 2,
                            "max_tokens": 4, "stop": "\n", "stream": False, **TAGS}),
    ("llm/v1/embeddings", {"input": "hello"}),
    ("llm/v1/embeddings", {"input": ["a", "b"], "dimensions": 64, "encoding_format": "base64",
                           "instruction": "query: ", **TAGS}),
    ("llm/v1/embeddings", {"input": [1, 2, 3]}),
    ("llm/v1/embeddings", {"input": [[1, 2], [3]]}),
]


@pytest.mark.parametrize("task, body", VALID)
def test_bodies_the_document_allows_are_accepted(task, body):
    _validator(task).validate(body)
    _parse(task, body)


INVALID = [
    ("llm/v1/chat", {}),
    ("llm/v1/chat", {"messages": []}),
    ("llm/v1/chat", {"messages": [{"content": "no role"}]}),
    ("llm/v1/chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("llm/v1/chat", {"messages": [{"role": "user", "content": "hi"}], "stop": [1]}),
    ("llm/v1/chat", {"messages": [{"role": "user", "content": "hi"}], "n": "2"}),
    ("llm/v1/chat", {"messages": [{"role": "user", "content": "hi"}],
                     "response_format": {"type": "xml"}}),
    ("llm/v1/chat", {"messages": [{"role": "user", "content": "hi"}],
                     "response_format": {"type": "json_schema"}}),
    ("llm/v1/chat", {"messages": [{"role": "user", "content": "hi"}], "user": "u" * 300}),
    ("llm/v1/chat", {"messages": [{"role": "user", "content": "hi"}],
                     "client_request_id": "x" * 129}),
    ("llm/v1/chat", {"messages": [{"role": "user", "content": "hi"}],
                     "usage_context": {"a": {"nested": 1}}}),
    ("llm/v1/completions", {}),
    ("llm/v1/completions", {"prompt": []}),
    ("llm/v1/completions", {"prompt": "a", "suffix": "b"}),
    ("llm/v1/completions", {"prompt": ["a"] * 65}),
    ("llm/v1/completions", {"prompt": "a", "logprobs": True}),
    ("llm/v1/embeddings", {}),
    ("llm/v1/embeddings", {"input": []}),
    ("llm/v1/embeddings", {"input": 5}),
    ("llm/v1/embeddings", {"input": "a", "encoding_format": "int8"}),
    ("llm/v1/embeddings", {"input": "a", "dimensions": 0}),
    ("llm/v1/embeddings", {"input": "a", "instruction": 3}),
]


@pytest.mark.parametrize("task, body", INVALID)
def test_bodies_the_parser_refuses_are_refused_by_the_document(task, body):
    with pytest.raises(InvalidArgument):
        _parse(task, body)
    with pytest.raises(ValidationError):
        _validator(task).validate(body)


def test_response_schemas_describe_what_the_gateway_sends():
    chat = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "e",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": openai_generation.usage(3, 1)}
    _validator("llm/v1/chat", "ChatCompletion").validate(chat)
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "e",
             "choices": [], "usage": openai_generation.usage(3, 1)}
    _validator("llm/v1/chat", "ChatCompletionChunk").validate(chunk)
    completion = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "e",
                  "choices": [{"index": 0, "text": "x", "finish_reason": "length",
                               "logprobs": {"tokens": ["x"], "token_logprobs": [-0.1],
                                            "top_logprobs": [{"x": -0.1}],
                                            "text_offset": [0]}}],
                  "usage": openai_generation.usage(3, 1)}
    _validator("llm/v1/completions", "Completion").validate(completion)
    with pytest.raises(ValidationError):  # a chat answer is not a completion
        _validator("llm/v1/completions", "Completion").validate(chat)

    import numpy as np

    from fmapi_gateway.embeddings import Embeddings

    vectors = np.ones((2, 3), dtype=np.float32)
    for fmt in ("float", "base64"):
        result = Embeddings("e", vectors, 4, {})
        body = json.loads(json.dumps(openai_embeddings.render(result, fmt),
                                     default=lambda a: a.tolist()))
        _validator("llm/v1/embeddings", "EmbeddingsResponse").validate(body)
