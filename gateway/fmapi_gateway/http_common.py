"""The HTTP boundary: JSON in and out, body limits, request ids, tracing, error mapping.

Every error that leaves the REST API goes through :func:`error_response`, which gives the OpenAI
body and Databricks' ``error_code`` at once, plus ``Retry-After`` on 429 and 503.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

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


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(err: FmapiError) -> Response:
    http = to_http(err)
    return JSON(http.body, status_code=http.status, headers=http.headers)


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
    return body


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
                    *[(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"],
                    rid_header,
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
                    resp = error_response(Internal(f"internal error (request id {rid})"))
                    await resp(scope, receive, send_with_id)
