"""The HTTP boundary: JSON in and out, body limits (size and nesting), request ids, tracing,
error mapping, and watching for clients that leave.

Every error that leaves the REST API goes through :func:`error_response`, which gives the OpenAI
body and Databricks' ``error_code`` at once, plus ``Retry-After`` on 429 and 503.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.requests import Request
from starlette.responses import Response

from fmapi_common.errors import FmapiError, Internal, InvalidArgument, PayloadTooLarge, to_http
from fmapi_common.telemetry import extract_http_context

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("fmapi.gateway")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Deepest JSON nesting accepted in a request body (the body object itself is level 1). Real
# bodies, JSON schemas in ``tools`` and ``response_format`` included, stay far below; much deeper
# nesting only serves to exhaust recursion in whatever walks the value next.
MAX_JSON_DEPTH = 64
_CONTAINERS = (dict, list)  # what orjson gives for objects and arrays
T = TypeVar("T")


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(err: FmapiError) -> Response:
    http = to_http(err)
    return JSON(http.body, status_code=http.status, headers=http.headers)


def internal_error(request_id: str) -> Response:
    """The answer to an unexpected failure: the standard 500 body, nothing about the cause."""
    return error_response(Internal(f"internal error (request id {request_id})"))


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past ``limit`` bytes, 400 for anything not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body is {int(declared)} bytes; the limit is {limit} bytes", reason="payload_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise InvalidArgument("request body is empty; send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidArgument(f"request body must be a JSON object, not {type(body).__name__}")
    _check_depth(raw, body)
    return body


def _check_depth(raw: bytes, body: dict) -> None:
    """400 naming the field whose value nests deeper than :data:`MAX_JSON_DEPTH` levels."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return  # too few brackets to nest that deep (brackets inside strings only add to this)
    check_depth(body)


def check_depth(body: dict) -> None:
    """The same limit on a body built another way (the gRPC API's, from its JSON-text fields)."""
    for key, value in body.items():
        if _depth(value, MAX_JSON_DEPTH) >= MAX_JSON_DEPTH:
            raise InvalidArgument(
                f"request body nests JSON more than {MAX_JSON_DEPTH} levels deep (in '{key}'); "
                f"at most {MAX_JSON_DEPTH} levels are allowed",
                param=key,
            )


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), counted level by level
    (no recursion) and no further than ``limit``."""
    depth, level = 0, [value] if type(value) in _CONTAINERS else []
    while level and depth < limit:
        depth += 1
        level = [c for v in level for c in _containers_in(v)]
    return depth


def _containers_in(value: dict | list) -> list:
    items = value.values() if type(value) is dict else value
    kinds = set(map(type, items))  # C speed: a million token ids take milliseconds
    if dict in kinds or list in kinds:
        return [c for c in items if type(c) in _CONTAINERS]
    return []


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client disconnects first: then ``work`` is cancelled (so it
    closes what it opened, such as generation streams) and :class:`ClientDisconnected` raised.
    Only once the body has been read: the watch consumes ``receive``."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def trace_id(span) -> str:
    """The trace a request belongs to, as the 32 hex digits a tracing backend searches by: the
    response's ``x-fmapi-trace-id`` (REST header, gRPC metadata), for a user to hand an SRE."""
    return format(span.get_span_context().trace_id, "032x")


class RequestContextMiddleware:
    """Pure ASGI middleware: request id on every response, a server span per request, and a
    last-resort 500 in the error shape (never a bare stack trace)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode())
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [
                    *[(k, v) for k, v in message.get("headers", [])
                      if k.lower() not in (b"x-request-id", b"x-fmapi-trace-id")],
                    rid_header,
                    (b"x-fmapi-trace-id", trace_id(span).encode()),
                ]
                span.set_attribute("http.response.status_code", message["status"])
                if message["status"] >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            await send(message)

        ctx = extract_http_context(headers)
        name = f"{scope['method']} {scope['path']}"
        with _tracer.start_as_current_span(name, context=ctx, kind=SpanKind.SERVER) as span:
            span.set_attribute("http.request.method", scope["method"])
            span.set_attribute("url.path", scope["path"])
            span.set_attribute("fmapi.request_id", rid)
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:  # noqa: BLE001 - the last line of defence
                log.exception("unhandled error on %s (request %s)", name, rid)
                span.record_exception(exc)
                if not started:
                    await internal_error(rid)(scope, receive, send_with_id)
