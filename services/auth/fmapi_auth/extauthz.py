"""Envoy external authorization (``envoy.service.auth.v3.Authorization/Check``).

Envoy asks before forwarding any request. The answer:

* ``/healthz`` (and the gRPC health service): allowed without a token; so is reading the web
  console's static files (``GET``/``HEAD`` ``/console`` and ``/console/...``), whose every
  data call is an API call with a token.
* Otherwise the request needs ``authorization: Bearer <fmapi token>`` (HTTP header or gRPC
  metadata; the Databricks SDK and the OpenAI SDK both send exactly this).
* Allowed: an OkHttpResponse that sets the signed identity headers
  (:mod:`fmapi_common.identity`), removes every other client-sent ``x-fmapi-*`` header and the
  ``authorization`` header (backends never see secrets).
* Denied: 401 (missing, malformed, unknown, revoked or expired token), 403 (scope), 400 (path
  with dot segments), 503 (Redis unreachable: fail closed). HTTP callers get the JSON error body
  of :func:`fmapi_common.errors.to_http`; gRPC callers (``content-type: application/grpc*``) get
  ``grpc-status``/``grpc-message``/``grpc-status-details-bin`` that their client library reads.

Scope is checked here when the endpoint is in the path; for endpoints named in the body (OpenAI
``model``, gRPC requests) the gateway checks the exported ``x-fmapi-scopes`` itself.

Check runs before every request, so its allow path is kept cheap: path rules are memoised, and a
token's identity header values are built once per token record. The signature itself is made per
request, bound to its method, path and ``x-request-id`` (:mod:`fmapi_common.identity`), so a
captured set of identity headers is worth nothing on another request or a few seconds later.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import quote, unquote

import prometheus_client
from envoy.config.core.v3 import base_pb2
from opentelemetry import trace
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from fmapi_common import identity as ident
from fmapi_common.telemetry import extract_http_context
from fmapi_common.errors import (
    FmapiError,
    Internal,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    rich_status,
    to_http,
)

from .tokens import TokenRecord, TokenStore

log = logging.getLogger(__name__)

SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
#: Envoy calls this once per request: it is served without the generic interceptors (it maps
#: every error into its own answer, and Envoy's request is what a trace would show).
CHECK_METHOD = f"/{SERVICE_NAME}/Check"

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


class Access(Enum):
    PUBLIC = "public"  # no token
    TOKEN = "token"  # any valid token
    BODY = "body"  # inference naming its endpoint in the body: needs some endpoint scope
    QUERY = "query"  # inference on the endpoint in the path: scope must match
    READ = "read"  # read the endpoint in the path: scope must match, or admin
    ADMIN = "admin"  # token or endpoint management (and fmapi's own admin API, /api/2.0/fmapi/)


@dataclass(frozen=True)
class Rule:
    access: Access
    endpoint: str | None = None


_BODY_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/serving-endpoints/chat/completions",
        "/serving-endpoints/completions",
        "/serving-endpoints/embeddings",
    }
)
_INVOCATIONS = re.compile(r"^/serving-endpoints/([^/]+)/invocations/?$")
_MODEL = re.compile(r"^/v1/models/([^/]+)/?$")
_DB_ENDPOINT = re.compile(r"^/api/2\.0/serving-endpoints/([^/]+)(?:/.*)?$")
_DB_ENDPOINTS = re.compile(r"^/api/2\.0/serving-endpoints/?$")
_TOKEN_MGMT = re.compile(r"^/api/2\.0/(?:token|tokens|token-management|fmapi)(?:/.*)?$")
_INFERENCE_GRPC = "/fmapi.inference.v1.InferenceService/"
_INTERNAL_GRPC = re.compile(r"^/fmapi\.(?:auth|routing|quota|generation|embedding)\.v\d+\.")
_READ_METHODS = frozenset({"GET", "HEAD"})
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_CONSOLE = "/console"  # the web console's static files (gateway/fmapi_gateway/console.py)


def classify(method: str, path: str) -> Rule:
    """What a request to ``method path`` needs (``path`` may carry a query string)."""
    method = (method or "GET").upper()
    raw_path = path.split("?", 1)[0].split("#", 1)[0]
    if len(method) + len(raw_path) > _MEMO_MAX_LEN:
        return _classify(method, raw_path)
    return _classify_memo(method, raw_path)


def _classify(method: str, raw_path: str) -> Rule:
    p = unquote(raw_path) or "/"
    segments = p.split("/")
    if ".." in segments or "." in segments:
        raise InvalidArgument("request path must not contain '.' or '..' segments")
    p = re.sub(r"/{2,}", "/", p)
    if p in ("/healthz", _HEALTH_CHECK):
        # One answer each; not Health/Watch, a stream that may stay open for a day (Envoy's
        # idle limit) without a byte: open to anyone, a flood of them would hold the
        # gateway's memory. It needs a token, as every other method does.
        return Rule(Access.PUBLIC)
    if method in _READ_METHODS and (p == _CONSOLE or p.startswith(_CONSOLE + "/")):
        return Rule(Access.PUBLIC)
    if p in _BODY_PATHS:
        return Rule(Access.BODY)
    if p.startswith(_INFERENCE_GRPC):
        if p in (_INFERENCE_GRPC + "ListModels", _INFERENCE_GRPC + "GetModel"):
            return Rule(Access.TOKEN)  # the gateway checks GetModel's endpoint against scopes
        return Rule(Access.BODY)
    if m := _INVOCATIONS.match(p):
        return Rule(Access.QUERY, m.group(1))
    if m := _MODEL.match(p):
        return Rule(Access.READ, m.group(1))
    if _TOKEN_MGMT.match(p) or _INTERNAL_GRPC.match(p):
        return Rule(Access.ADMIN)
    if _DB_ENDPOINTS.match(p):
        return Rule(Access.TOKEN if method in _READ_METHODS else Access.ADMIN)
    if m := _DB_ENDPOINT.match(p):
        if method in _READ_METHODS:
            return Rule(Access.READ, m.group(1))
        return Rule(Access.ADMIN)
    return Rule(Access.TOKEN)


# The rule depends on the method and path alone: remember it for the paths clients repeat (a
# refused path raises and is not remembered; long paths are never kept, so memory stays small).
_MEMO_MAX_LEN = 256
_classify_memo = functools.lru_cache(maxsize=1024)(_classify)


def bearer_token(authorization: str | None) -> str:
    """The secret in an ``Authorization: Bearer <secret>`` value."""
    if authorization is None or not authorization.strip():
        raise Unauthenticated(
            "missing API token: send the header 'Authorization: Bearer <token>'"
        )
    parts = authorization.strip().split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise Unauthenticated(
            "malformed Authorization header: expected 'Authorization: Bearer <token>'"
        )
    return parts[1]


def authorize(rule: Rule, rec: TokenRecord) -> None:
    """Raise :class:`PermissionDenied` unless ``rec`` may do what ``rule`` needs."""
    if rule.access in (Access.PUBLIC, Access.TOKEN):
        return
    if rule.access is Access.ADMIN:
        if not rec.admin:
            raise PermissionDenied("this API token is not an admin token")
        return
    if rule.access is Access.BODY:
        if not rec.endpoints:
            raise PermissionDenied("this API token may not query any endpoint")
        return
    assert rule.endpoint is not None
    if rule.access is Access.READ and rec.admin:
        return
    if not ident.may_query(rec.endpoints, rule.endpoint):
        raise PermissionDenied(
            f"this API token may not query endpoint '{rule.endpoint}'", param="endpoint"
        )


def _is_grpc(headers: dict[str, str]) -> bool:
    ct = headers.get("content-type", "").lower()
    return ct == "application/grpc" or ct.startswith(("application/grpc+", "application/grpc;"))


def _option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def _grpc_message(message: str) -> str:
    # gRPC percent-encodes grpc-message (everything outside printable ASCII, and '%').
    return quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _status_details(err: FmapiError) -> str:
    return base64.b64encode(rich_status(err).SerializeToString()).decode().rstrip("=")


def denied(err: FmapiError, *, grpc: bool) -> external_auth_pb2.CheckResponse:
    """The CheckResponse that makes Envoy answer with ``err``."""
    http = to_http(err)
    headers = dict(http.headers)
    if http.status == 401:
        headers["www-authenticate"] = 'Bearer realm="fmapi", error="invalid_token"'
    if grpc:
        # Envoy turns a local reply to a gRPC request into HTTP 200 + trailers-only, mapping 401
        # to UNAUTHENTICATED, 403 to PERMISSION_DENIED and 503 to UNAVAILABLE; we set grpc-status
        # and grpc-message ourselves so they carry our code and a readable message (not the body).
        headers["content-type"] = "application/grpc"
        headers["grpc-status"] = str(err.grpc_code.value[0])
        headers["grpc-message"] = _grpc_message(err.message)
        headers["grpc-status-details-bin"] = _status_details(err)
        body = ""
    else:
        headers["content-type"] = "application/json"
        body = json.dumps(http.body, separators=(",", ":"))
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=err.grpc_code.value[0], message=err.message),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http.status),
            headers=[_option(k, v) for k, v in headers.items()],
            body=body,
        ),
    )


def allowed(
    client_headers: dict[str, str],
    identity_headers: dict[str, str],
    *,
    strip: tuple[str, ...] = (),
    metadata: dict[str, str] | None = None,
) -> external_auth_pb2.CheckResponse:
    """Allow, setting ``identity_headers`` and removing every other client ``x-fmapi-*`` header.

    The removals never name a header we set (Envoy applies removals after additions).
    """
    return _ok_response(
        [_option(k, v) for k, v in identity_headers.items()],
        _removals(client_headers, identity_headers, strip),
        _struct(metadata) if metadata else None,
    )


def _removals(
    client_headers: Mapping[str, str],
    keep: Mapping[str, str] | frozenset[str],
    strip: tuple[str, ...],
) -> tuple[str, ...]:
    """Client headers to remove: every ``x-fmapi-*`` one and those in ``strip``, except ``keep``."""
    remove = {h for h in client_headers if h.startswith(ident.HEADER_PREFIX) and h not in keep}
    remove.update(h for h in strip if h in client_headers and h not in keep)
    return tuple(sorted(remove))


def _ok_response(
    options: list[base_pb2.HeaderValueOption],
    remove: tuple[str, ...],
    metadata: struct_pb2.Struct | None,
) -> external_auth_pb2.CheckResponse:
    resp = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=0),
        ok_response=external_auth_pb2.OkHttpResponse(headers=options, headers_to_remove=remove),
    )
    if metadata is not None:
        resp.dynamic_metadata.CopyFrom(metadata)
    return resp


def _struct(values: dict[str, str]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def request_headers(http) -> dict[str, str]:
    """Lower-cased request headers from an AttributeContext.HttpRequest (either encoding)."""
    if http.header_map.headers:
        out: dict[str, str] = {}
        for hv in http.header_map.headers:
            value = hv.value or hv.raw_value.decode("utf-8", "replace")
            key = hv.key.lower()
            out[key] = f"{out[key]},{value}" if key in out else value
        return out
    return {k.lower(): v for k, v in http.headers.items()}


_IDENTITY_HEADERS = frozenset(ident.ALL_HEADERS)
# Token records whose identity header options are kept (a bound on memory, not a correctness knob).
_MAX_VOUCHED = 10_000


@dataclass
class _Vouched:
    """What is the same on every allow for one token record: its identity headers, unsigned."""

    record: TokenRecord
    values: dict[str, str]
    options: list[base_pb2.HeaderValueOption]
    metadata: struct_pb2.Struct


_tracer = trace.get_tracer("fmapi.auth")


def _trace_context(metadata):
    """The trace context Envoy sent with its Check call (only when Envoy traces), else None."""
    carrier = {k: v for k, v in metadata if k in ("traceparent", "tracestate")}
    return extract_http_context(carrier) if "traceparent" in carrier else None


DECISIONS = prometheus_client.Counter(
    "fmapi_authz_decisions", "Envoy's external authorization checks, by decision", ["decision"])
_DECISION = {Unauthenticated: "unauthenticated", PermissionDenied: "permission_denied",
             Unavailable: "unavailable", InvalidArgument: "invalid"}


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """Envoy's Check, against the token store."""

    def __init__(
        self,
        store: TokenStore,
        identity_key: bytes,
        *,
        strip_authorization: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._key = identity_key
        self._strip = ("authorization",) if strip_authorization else ()
        self._clock = clock
        self._vouched: dict[str, _Vouched] = {}  # token sha256 -> its identity headers

    async def Check(self, request, context):  # noqa: N802 - gRPC method name
        traced = _trace_context(context.invocation_metadata() or ())
        if traced is None:  # Envoy traces nothing: no span, nothing spent on one
            return (await self._decide(request))[0]
        # Envoy traces this request: its ext_authz call is the parent of the decision's span.
        with _tracer.start_as_current_span(CHECK_METHOD.lstrip("/"), context=traced,
                                           kind=trace.SpanKind.SERVER) as span:
            resp, decision = await self._decide(request)
            span.set_attribute("fmapi.authz.decision", decision)
            if decision != "allowed":
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"refused: {decision}"))
            return resp

    async def _decide(self, request) -> tuple[external_auth_pb2.CheckResponse, str]:
        http = request.attributes.request.http
        headers = request_headers(http)
        path = http.path or headers.get(":path", "/")
        method = http.method or headers.get(":method", "GET")
        try:
            resp, decision = await self._check(method, path, headers), "allowed"
        except FmapiError as err:
            log.debug("denied %s %s: %s", method, path.split("?", 1)[0], err.message)
            resp, decision = denied(err, grpc=_is_grpc(headers)), _DECISION.get(type(err), "error")
        except Exception:  # noqa: BLE001 - never let a bug turn into an allow
            log.exception("ext_authz check failed for %s %s", method, path.split("?", 1)[0])
            resp, decision = denied(Internal("authorization failed"), grpc=_is_grpc(headers)), "error"
        DECISIONS.labels(decision).inc()
        return resp, decision

    async def _check(self, method: str, path: str, headers: dict[str, str]):
        rule = classify(method, path)
        if rule.access is Access.PUBLIC:
            return allowed(headers, {})
        secret = bearer_token(headers.get("authorization"))
        try:
            rec = await self._store.authenticate(secret)
        except Unavailable:
            raise Unavailable(
                "authorization is temporarily unavailable (token store unreachable); retry",
                retry_after=1.0,
            ) from None
        authorize(rule, rec)
        return self._allow(rec, headers, ident.Binding.of(method, path, headers.get(ident.REQUEST_ID, "")))

    def _allow(self, rec: TokenRecord, headers: Mapping[str, str], binding: ident.Binding):
        """Allow this one request as ``rec``'s identity, signed for ``binding``."""
        v = self._vouched.get(rec.sha256)
        if v is None or v.record != rec:
            v = self._vouch(rec)
        signed = ident.sign(v.values, self._key, self._clock(), binding)
        options = [
            *v.options,
            _option(ident.TIMESTAMP, signed[ident.TIMESTAMP]),
            _option(ident.SIGNATURE, signed[ident.SIGNATURE]),
        ]
        return _ok_response(options, _removals(headers, _IDENTITY_HEADERS, self._strip), v.metadata)

    def _vouch(self, rec: TokenRecord) -> _Vouched:
        values = rec.identity().to_headers()
        v = _Vouched(
            record=rec,
            values=values,
            options=[_option(k, val) for k, val in values.items()],
            metadata=_struct(
                {"principal": rec.principal, "workspace": rec.workspace, "token_id": rec.id}
            ),
        )
        if len(self._vouched) >= _MAX_VOUCHED:
            self._vouched.clear()
        self._vouched[rec.sha256] = v
        return v
