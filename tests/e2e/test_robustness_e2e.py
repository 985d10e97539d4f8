"""Attacks from a probe of the running system, replayed through Envoy against the session's
system: each asserts the fixed behaviour."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import grpc
import pytest

from fmapi.inference.v1 import inference_pb2, inference_pb2_grpc
from helpers.engine import running_requests, wait_for
from helpers.tiny_llm import LONG_GENERATION

CHAT = "tiny-chat"
EMBED = "all-minilm-l6-v2"
HELLO = [{"role": "user", "content": "hello there, how are you today"}]
LONG = "x" * 4096


def json_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()["error"]


# ---------------------------------------------------------------- 7: a client that leaves


def open_request(system, path: str, body: dict) -> socket.socket:
    """A raw HTTP/1.1 request through Envoy, sent and left waiting for its answer."""
    url = urlsplit(system.base_url)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nhost: {url.netloc}\r\n"
        f"authorization: Bearer {system.admin_token}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n".encode() + payload
    )
    return sock


def test_a_non_streaming_client_that_leaves_stops_its_generation(system):
    # Four long generations (the probe left 4 x 1200 tokens running for 55 s).
    body = {"model": CHAT, "messages": HELLO, "max_tokens": LONG_GENERATION, "ignore_eos": True}
    socks = [open_request(system, "/v1/chat/completions", body) for _ in range(4)]
    wait_for(lambda: running_requests(system) >= 4, 30, "the generations never started")
    for s in socks:
        s.close()
    wait_for(lambda: running_requests(system) == 0, 1.0,
             "the engine kept generating after the clients left")


# ---------------------------------------------------------------- 10: deep JSON nesting


@pytest.mark.parametrize(
    "field, wrap",
    [
        ("tools", lambda v: [{"type": "function", "function": {"name": "f", "parameters": v}}]),
        ("response_format", lambda v: {"type": "json_schema", "json_schema": {"name": "s", "schema": v}}),
        ("tool_choice", lambda v: {"type": "function", "function": {"name": v}}),
        ("tool_calls", None),
    ],
)
def test_json_nested_990_levels_deep_is_a_400(http, field, wrap):
    deep = "[" * 990 + "]" * 990
    if field == "tool_calls":
        assistant = '{"role": "assistant", "content": null, "tool_calls": ' + deep + "}"
        raw = '{"model": "%s", "messages": [%s, %s]}' % (CHAT, json.dumps(HELLO[0]), assistant)
    else:
        marker = '"__DEEP__"'
        value = json.dumps(wrap("__DEEP__")).replace(marker, deep)
        raw = '{"model": "%s", "messages": %s, "%s": %s}' % (CHAT, json.dumps(HELLO), field, value)
    r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    err = json_error(r, 400)
    assert "64 levels" in err["message"], err
    assert err["param"] == ("messages" if field == "tool_calls" else field)  # the top-level field


# ---------------------------------------------------------------- 11: overlong names


@pytest.mark.parametrize(
    "method, path, body, param",
    [
        ("POST", "/v1/chat/completions", {"model": LONG, "messages": HELLO}, "model"),
        ("POST", "/v1/embeddings", {"model": LONG, "input": "hi"}, "model"),
        ("POST", "/serving-endpoints/chat/completions", {"model": LONG, "messages": HELLO}, "model"),
        ("POST", f"/serving-endpoints/{LONG}/invocations", {"messages": HELLO}, "name"),
        ("GET", f"/api/2.0/serving-endpoints/{LONG}", None, "name"),
        ("GET", f"/v1/models/{LONG}", None, "model"),
        ("POST", "/api/2.0/token/delete", {"token_id": "a" * 4096}, "token_id"),
    ],
)
def test_overlong_names_get_a_400_naming_the_parameter(http, method, path, body, param):
    r = http.request(method, path, json=body)
    err = json_error(r, 400)
    assert err["param"] == param, err
    assert "retry-after" not in r.headers


@pytest.mark.parametrize("rpc", ["Embed", "Chat"])
def test_overlong_endpoint_names_over_grpc_are_invalid_argument(system, rpc):
    with grpc.insecure_channel(f"127.0.0.1:{system.http_port}") as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        auth = (("authorization", f"Bearer {system.admin_token}"),)
        with pytest.raises(grpc.RpcError) as err:
            if rpc == "Embed":
                stub.Embed(inference_pb2.EmbedRequest(endpoint=LONG, texts=["hi"]), metadata=auth, timeout=30)
            else:
                req = inference_pb2.ChatRequest(
                    endpoint=LONG, messages=[inference_pb2.Message(role="user", content="hi")])
                list(stub.Chat(req, metadata=auth, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "'endpoint'" in err.value.details() and LONG not in err.value.details()


# ---------------------------------------------------------------- 13: slashes and lifetimes


def test_a_trailing_slash_is_a_404_without_a_redirect(http):
    r = http.post("/v1/embeddings/", json={"model": EMBED, "input": "hi"},
                  headers={"host": "evil.example"})
    json_error(r, 404)
    assert "location" not in r.headers


def test_token_lifetimes_have_one_limit(http):
    ten_years = 10 * 365 * 86400
    ok = http.post("/api/2.0/token/create", json={"comment": "ten years", "lifetime_seconds": ten_years})
    assert ok.status_code == 200, ok.text
    http.post("/api/2.0/token/delete", json={"token_id": ok.json()["token_info"]["token_id"]})
    # The gateway said "100 years" past 100 years, auth its own limit below that: one limit now.
    for years in (11, 200):
        r = http.post("/api/2.0/token/create", json={"lifetime_seconds": years * 365 * 86400})
        err = json_error(r, 400)
        assert err["param"] == "lifetime_seconds" and str(ten_years) in err["message"], err


