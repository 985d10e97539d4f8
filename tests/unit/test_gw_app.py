"""The REST app's boundary, in-process: every error in the standard body (an unexpected one
included), JSON nesting bounded, no slash redirects, names checked before they travel."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from fmapi_common.identity import Binding, Identity, sign_identity
from fmapi_gateway.backends import Backends
from fmapi_gateway.http_common import MAX_JSON_DEPTH
from helpers.gateway_app import KEY, app_client, unreachable_config

ADMIN = Identity("admin", "default", "t1", ("*",), admin=True)


class Broken(Backends):
    """Routing that fails in a way nobody planned for; and must not be reached otherwise."""

    async def list_endpoints(self):
        raise RuntimeError("an unexpected bug")

    async def resolve(self, name):
        raise AssertionError("a refused request reached routing")

    async def get_endpoint(self, name):
        raise AssertionError("a refused request reached routing")


@pytest.fixture
async def client():
    async with app_client(unreachable_config(), Broken) as c:
        yield c


async def call(client, method: str, path: str, body: dict | bytes | None = None) -> httpx.Response:
    rid = uuid.uuid4().hex
    headers = {"x-request-id": rid, **sign_identity(ADMIN, bytes.fromhex(KEY), time.time(),
                                                    Binding.of(method, path, rid))}
    if isinstance(body, bytes):
        return await client.request(method, path, content=body, headers=headers)
    return await client.request(method, path, json=body, headers=headers)


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"]["message"] and body["error_code"], body
    return body


def nested(depth: int) -> bytes:
    """A JSON value nested ``depth`` levels deep, written out (json.dumps would recurse)."""
    return b"[" * depth + b"]" * depth


async def test_an_unexpected_exception_gets_the_standard_500_body(client):
    r = await call(client, "GET", "/v1/models")
    body = assert_error(r, 500)
    assert body["error"]["type"] == "server_error" and body["error_code"] == "INTERNAL_ERROR"
    assert r.headers["x-request-id"] in body["error"]["message"]
    assert "unexpected bug" not in r.text  # nothing about the cause leaks


@pytest.mark.parametrize("field", ["tools", "tool_calls", "response_format", "tool_choice"])
async def test_deep_nesting_is_refused_naming_the_field(client, field):
    body = b'{"model": "m", "messages": [], "' + field.encode() + b'": ' + nested(990) + b"}"
    r = await call(client, "POST", "/v1/chat/completions", body)
    err = assert_error(r, 400)["error"]
    assert err["param"] == field and f"{MAX_JSON_DEPTH} levels" in err["message"]


async def test_nesting_up_to_the_limit_passes_the_body_check(client):
    # The body object is level 1: a field may nest MAX_JSON_DEPTH - 1 levels more.
    ok = b'{"model": "", "x": ' + nested(MAX_JSON_DEPTH - 1) + b"}"
    r = await call(client, "POST", "/v1/embeddings", ok)
    assert r.json()["error"]["param"] == "model"  # refused later, for what it lacks
    deep = b'{"model": "", "x": ' + nested(MAX_JSON_DEPTH) + b"}"
    assert (await call(client, "POST", "/v1/embeddings", deep)).json()["error"]["param"] == "x"


async def test_a_trailing_slash_is_a_404_not_a_redirect(client):
    r = await call(client, "POST", "/v1/embeddings/", {"model": "m", "input": "x"})
    assert_error(r, 404)
    assert "location" not in r.headers


LONG = "e" * 4096


@pytest.mark.parametrize(
    "method, path, body, param",
    [
        ("POST", "/v1/chat/completions", {"model": LONG, "messages": [{"role": "user", "content": "hi"}]},
         "model"),
        ("POST", "/v1/completions", {"model": LONG, "prompt": "hi"}, "model"),
        ("POST", "/v1/embeddings", {"model": LONG, "input": "hi"}, "model"),
        ("POST", "/serving-endpoints/embeddings", {"model": LONG, "input": "hi"}, "model"),
        ("POST", f"/serving-endpoints/{LONG}/invocations", {"input": "hi"}, "name"),
        ("GET", f"/api/2.0/serving-endpoints/{LONG}", None, "name"),
        ("GET", f"/v1/models/{LONG}", None, "model"),
        ("POST", "/api/2.0/token/delete", {"token_id": "f" * 4096}, "token_id"),
        ("POST", "/api/2.0/token/delete", {"token_id": "../x"}, "token_id"),
    ],
)
async def test_overlong_names_are_refused_at_the_boundary(client, method, path, body, param):
    r = await call(client, method, path, body)
    err = assert_error(r, 400)["error"]
    assert err["param"] == param
    assert len(r.content) < 1024  # the name is not echoed back
