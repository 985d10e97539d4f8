"""ext_authz decisions that need no Redis: path rules, bearer parsing, scope, response shapes."""

from __future__ import annotations

import base64
import json

import pytest
from envoy.config.core.v3 import base_pb2
from google.rpc import error_details_pb2, status_pb2

from fmapi_auth.extauthz import Access, Rule, allowed, authorize, bearer_token, classify, denied
from fmapi_auth.tokens import TokenRecord
from fmapi_common.errors import (
    InvalidArgument,
    stable_code,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)


@pytest.mark.parametrize(
    ("method", "path", "rule"),
    [
        ("GET", "/healthz", Rule(Access.PUBLIC)),
        ("GET", "/healthz?verbose=1", Rule(Access.PUBLIC)),
        ("POST", "/grpc.health.v1.Health/Check", Rule(Access.PUBLIC)),
        ("POST", "/grpc.health.v1.Health/Watch", Rule(Access.TOKEN)),
        ("POST", "/grpc.health.v1.Health/Check/x", Rule(Access.TOKEN)),
        ("GET", "/healthzz", Rule(Access.TOKEN)),
        ("POST", "/v1/chat/completions", Rule(Access.BODY)),
        ("POST", "/v1/completions", Rule(Access.BODY)),
        ("POST", "/v1/embeddings?x=1", Rule(Access.BODY)),
        ("POST", "/serving-endpoints/chat/completions", Rule(Access.BODY)),
        ("POST", "/serving-endpoints/embeddings", Rule(Access.BODY)),
        ("POST", "/fmapi.inference.v1.InferenceService/Chat", Rule(Access.BODY)),
        ("POST", "/fmapi.inference.v1.InferenceService/ListModels", Rule(Access.TOKEN)),
        ("POST", "/serving-endpoints/gte/invocations", Rule(Access.QUERY, "gte")),
        ("POST", "/serving-endpoints/chat/invocations", Rule(Access.QUERY, "chat")),
        ("POST", "/serving-endpoints/my%2Dep/invocations", Rule(Access.QUERY, "my-ep")),
        ("POST", "//serving-endpoints//gte/invocations", Rule(Access.QUERY, "gte")),
        ("GET", "/v1/models", Rule(Access.TOKEN)),
        ("GET", "/v1/models/gte", Rule(Access.READ, "gte")),
        ("GET", "/api/2.0/serving-endpoints", Rule(Access.TOKEN)),
        ("POST", "/api/2.0/serving-endpoints", Rule(Access.ADMIN)),
        ("GET", "/api/2.0/serving-endpoints/gte", Rule(Access.READ, "gte")),
        ("PUT", "/api/2.0/serving-endpoints/gte/config", Rule(Access.ADMIN)),
        ("DELETE", "/api/2.0/serving-endpoints/gte", Rule(Access.ADMIN)),
        ("POST", "/api/2.0/token/create", Rule(Access.ADMIN)),
        ("GET", "/api/2.0/token/list", Rule(Access.ADMIN)),
        ("GET", "/api/2.0/token-management/tokens", Rule(Access.ADMIN)),
        ("POST", "/fmapi.auth.v1.AuthService/CreateToken", Rule(Access.ADMIN)),
        ("GET", "/something/else", Rule(Access.TOKEN)),
    ],
)
def test_classify(method, path, rule):
    assert classify(method, path) == rule


@pytest.mark.parametrize(
    "path", ["/healthz/../v1/chat/completions", "/serving-endpoints/a/../b/invocations", "/./x"]
)
def test_dot_segments_are_refused(path):
    with pytest.raises(InvalidArgument):
        classify("GET", path)
    with pytest.raises(InvalidArgument):
        classify("GET", path.replace("..", "%2e%2e"))


def test_bearer_token():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    for bad in (None, "", "   "):
        with pytest.raises(Unauthenticated, match="missing"):
            bearer_token(bad)
    for bad in ("abc", "Basic abc", "Bearer", "Bearer a b", "Bearer a,Bearer b"):
        with pytest.raises(Unauthenticated):
            bearer_token(bad)


def rec(endpoints=("chat-*",), admin=False) -> TokenRecord:
    return TokenRecord(
        id="t1", name="", principal="alice", principal_kind="user", workspace="w",
        endpoints=tuple(endpoints), admin=admin, created=0.0, expires=None, last_used=None,
        prefix="fmapi_abcd", sha256="0" * 64,
    )


def test_authorize():
    authorize(Rule(Access.TOKEN), rec(endpoints=()))
    authorize(Rule(Access.QUERY, "chat-a"), rec())
    with pytest.raises(PermissionDenied, match="embed"):
        authorize(Rule(Access.QUERY, "embed"), rec())
    authorize(Rule(Access.BODY), rec())
    with pytest.raises(PermissionDenied):
        authorize(Rule(Access.BODY), rec(endpoints=()))
    with pytest.raises(PermissionDenied):
        authorize(Rule(Access.ADMIN), rec())
    authorize(Rule(Access.ADMIN), rec(admin=True))
    authorize(Rule(Access.READ, "embed"), rec(admin=True))
    with pytest.raises(PermissionDenied):
        authorize(Rule(Access.READ, "embed"), rec())
    with pytest.raises(PermissionDenied):  # admin alone does not query
        authorize(Rule(Access.QUERY, "embed"), rec(endpoints=(), admin=True))


def _headers(opts) -> dict[str, str]:
    return {o.header.key: o.header.value for o in opts}


@pytest.mark.parametrize(
    ("err", "status", "code", "grpc_status"),
    [
        (Unauthenticated("no token"), 401, "UNAUTHENTICATED", 16),
        (PermissionDenied("scope"), 403, "PERMISSION_DENIED", 7),
        (Unavailable("redis down", retry_after=1.0), 503, "TEMPORARILY_UNAVAILABLE", 14),
    ],
)
def test_denied_http_and_grpc(err, status, code, grpc_status):
    r = denied(err, grpc=False)
    assert r.status.code == grpc_status
    assert r.denied_response.status.code == status
    h = _headers(r.denied_response.headers)
    assert h["content-type"] == "application/json"
    body = json.loads(r.denied_response.body)
    assert body["error_code"] == code
    assert body["message"] == err.message
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] is None
    if status == 401:
        assert h["www-authenticate"].startswith("Bearer")
    if status == 503:
        assert h["retry-after"] == "1"
    for o in r.denied_response.headers:
        assert o.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

    g = denied(err, grpc=True)
    gh = _headers(g.denied_response.headers)
    assert gh["grpc-status"] == str(grpc_status)
    assert gh["grpc-message"] == err.message
    assert gh["content-type"] == "application/grpc"
    raw = gh["grpc-status-details-bin"]
    st = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    assert st.code == grpc_status and st.message == err.message
    info = error_details_pb2.ErrorInfo()
    st.details[0].Unpack(info)
    assert info.reason == stable_code(err) and info.metadata["code"] == err.reason


def test_grpc_message_is_percent_encoded():
    g = denied(Unauthenticated("bad tökén 100%\n"), grpc=True)
    assert _headers(g.denied_response.headers)["grpc-message"] == "bad t%C3%B6k%C3%A9n 100%25%0A"


def test_allowed_overwrites_identity_and_removes_other_client_fmapi_headers():
    client = {
        "x-fmapi-principal": "mallory",
        "x-fmapi-anything": "1",
        "authorization": "Bearer x",
        "content-type": "application/json",
    }
    ids = {"x-fmapi-principal": "alice", "x-fmapi-identity-sig": "v1=..."}
    r = allowed(client, ids, strip=("authorization",), metadata={"principal": "alice"})
    assert r.status.code == 0
    assert _headers(r.ok_response.headers) == ids
    assert all(
        o.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        for o in r.ok_response.headers
    )
    # Never remove what we set: Envoy applies removals after additions.
    assert sorted(r.ok_response.headers_to_remove) == ["authorization", "x-fmapi-anything"]
    assert r.dynamic_metadata["principal"] == "alice"
