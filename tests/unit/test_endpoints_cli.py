"""`fmapi endpoints` against a stand-in REST server: requests sent, output, errors, exit codes."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

import pytest

from fmapi_cli import tokens
from fmapi_cli.main import main
from helpers.standin_http import send_json, serving

ADMIN = "admin-secret"
GATEWAY = {
    "rate_limits": [
        {"key": "user", "calls": 600, "renewal_period": "minute"},
        {"key": "endpoint", "tokens": 10000, "renewal_period": "minute"},
        {"key": "user", "principal": "alice", "calls": 100, "tokens": 5000, "input_tokens": 0,
         "output_tokens": 0, "renewal_period": "minute"},
    ],
    "usage_tracking_config": {"enabled": True},
    "inference_table_config": {"enabled": False},
    "fallback_config": {"enabled": False},
}
CHAT = {
    "name": "chat", "id": "chat", "task": "llm/v1/chat", "description": "a chat model",
    "state": {"ready": "READY", "config_update": "NOT_UPDATING"},
    "config": {
        "served_entities": [
            {"name": "a", "entity_name": "model-a", "foundation_model": {"name": "model-a"}},
            {"name": "b", "entity_name": "model-b", "foundation_model": {"name": "model-b"}},
        ],
        "traffic_config": {"routes": [{"served_model_name": "a", "traffic_percentage": 80},
                                      {"served_model_name": "b", "traffic_percentage": 20}]},
        "config_version": 3,
    },
    "ai_gateway": GATEWAY,
    "tags": [{"key": "team", "value": "ml"}],
    "capacity_mode": "pay_per_token",
    "creation_timestamp": 1_700_000_000_000,
    "last_updated_timestamp": 1_700_000_000_000,
}
# The server leaves out what it does not know: the CLI must cope.
BARE = {"name": "emb", "task": "llm/v1/embeddings",
        "config": {"served_entities": [{"name": "e", "entity_name": "minilm"}]}}
NOT_FOUND = (404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                   "message": "endpoint 'nope' does not exist"})


class _Api(BaseHTTPRequestHandler):
    calls: list = []
    routes: dict = {}

    def _handle(self):
        n = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        self.calls.append((self.command, self.path, self.headers.get("authorization"), body))
        status, reply = self.routes.get((self.command, self.path), (404, {"message": "no route"}))
        if callable(reply):
            reply = reply(body)
        send_json(self, status, reply)

    do_GET = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    with serving(_Api) as url:
        yield url


@pytest.fixture
def api(server):
    _Api.calls, _Api.routes = [], {}
    return server


@pytest.fixture
def fmapi(api, monkeypatch, tmp_path):
    """Run `fmapi endpoints ...` with the stand-in's URL and no token from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tokens, "REPO_DEV_TOKEN_FILE", tmp_path / "absent")
    monkeypatch.delenv("FMAPI_TOKEN", raising=False)
    monkeypatch.setenv("FMAPI_URL", api)

    def run(*argv, token: str | None = ADMIN):
        return main(["endpoints", *argv, *(["--token", token] if token else [])])

    return run


def lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


# ---------------------------------------------------------------- list / get


def test_list_prints_a_table_of_endpoints(fmapi, capsys):
    _Api.routes[("GET", "/api/2.0/serving-endpoints")] = (200, {"endpoints": [CHAT, BARE]})
    assert fmapi("list") == 0
    assert _Api.calls == [("GET", "/api/2.0/serving-endpoints", f"Bearer {ADMIN}", None)]
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "TASK", "STATE", "UPDATE", "MODE", "MODELS", "LIMITS"]
    assert out[1].split()[:6] == [
        "chat", "llm/v1/chat", "READY", "NOT_UPDATING", "pay_per_token",
        "model-a(80%),model-b(20%)"]
    # Columns line up under their headers.
    assert out[1].index("READY") == out[0].index("STATE")
    assert out[1].endswith(
        "  user 600 req/min, endpoint 10000 tok/min, user=alice 100 req/min 5000 tok/min")
    # One entity: no traffic split shown; missing state, mode and limits read as "-".
    assert out[2].split() == ["emb", "llm/v1/embeddings", "-", "-", "-", "minilm", "-"]


def test_list_json_prints_the_response(fmapi, capsys):
    _Api.routes[("GET", "/api/2.0/serving-endpoints")] = (200, {"endpoints": [BARE]})
    assert fmapi("list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"endpoints": [BARE]}


def test_get_describes_the_endpoint(fmapi, capsys):
    _Api.routes[("GET", "/api/2.0/serving-endpoints/chat")] = (200, CHAT)
    assert fmapi("get", "chat") == 0
    out = capsys.readouterr().out
    assert _Api.calls[0][:2] == ("GET", "/api/2.0/serving-endpoints/chat")
    rows = lines(out)
    assert ["name:", "chat"] in rows
    assert ["task:", "llm/v1/chat"] in rows
    assert ["description:", "a", "chat", "model"] in rows
    assert ["state:", "READY", "(config", "update:", "NOT_UPDATING)"] in rows
    assert ["capacity", "mode:", "pay_per_token"] in rows
    assert ["usage", "tracking:", "enabled"] in rows
    assert ["inference", "table:", "disabled"] in rows
    assert ["fallback:", "disabled"] in rows
    assert ["created:", "2023-11-14", "22:13:20Z"] in rows
    assert ["a", "model-a", "80%"] in rows and ["b", "model-b", "20%"] in rows
    assert ["user", "alice", "100", "5000", "-", "-"] in rows
    assert ["team=ml"] in rows


def test_get_copes_with_a_sparse_endpoint(fmapi, capsys):
    _Api.routes[("GET", "/api/2.0/serving-endpoints/emb")] = (200, BARE)
    assert fmapi("get", "emb") == 0
    rows = lines(capsys.readouterr().out)
    assert ["e", "minilm", "-"] in rows
    assert ["no", "rate", "limits"] in rows
    assert ["tags:", "-"] in rows


def test_get_json_prints_the_response(fmapi, capsys):
    _Api.routes[("GET", "/api/2.0/serving-endpoints/chat")] = (200, CHAT)
    assert fmapi("get", "chat", "--json") == 0
    assert json.loads(capsys.readouterr().out) == CHAT


def test_server_error_prints_message_and_status_and_exits_1(fmapi, capsys):
    assert fmapi("get", "nope") == 1  # the stand-in answers 404 for unknown paths
    _Api.routes[("GET", "/api/2.0/serving-endpoints/nope")] = NOT_FOUND
    assert fmapi("get", "nope") == 1
    err = capsys.readouterr()
    assert err.out == ""
    assert "404" in err.err and "endpoint 'nope' does not exist" in err.err


def test_openai_shaped_error_message_is_shown(fmapi, capsys):
    _Api.routes[("GET", "/api/2.0/serving-endpoints")] = (
        403, {"error": {"message": "this token may not manage endpoints"}})
    assert fmapi("list") == 1
    err = capsys.readouterr().err
    assert "403" in err and "this token may not manage endpoints" in err


def test_token_comes_from_the_environment(fmapi, monkeypatch):
    monkeypatch.setenv("FMAPI_TOKEN", "from-env")
    _Api.routes[("GET", "/api/2.0/serving-endpoints")] = (200, {"endpoints": []})
    assert fmapi("list", token=None) == 0
    assert _Api.calls[0][2] == "Bearer from-env"


def test_no_token_is_an_error_before_any_request(fmapi, capsys):
    assert fmapi("list", token=None) == 1
    assert "no API token" in capsys.readouterr().err
    assert _Api.calls == []


# ---------------------------------------------------------------- apply / delete

DEV_YAML = """
static_replicas: 2
endpoints:
  - name: emb
    task: llm/v1/embeddings
    served_entities:
      - model: minilm
    limits:
      requests_per_minute: 6000
  - name: chat
    task: llm/v1/chat
    served_entities: [{model: gemma}]
"""


@pytest.mark.parametrize("prune", [False, True])
def test_apply_sends_only_the_endpoints_and_reports_each(fmapi, tmp_path, capsys, prune):
    (tmp_path / "eps.yaml").write_text(DEV_YAML)
    _Api.routes[("POST", "/api/2.0/fmapi/endpoints/apply")] = (200, {
        "created": ["foo"], "updated": ["bar"], "unchanged": ["baz"], "deleted": ["qux"],
        "version": 7})
    assert fmapi("apply", "-f", "eps.yaml", *(["--prune"] if prune else [])) == 0
    method, path, auth, body = _Api.calls[0]
    assert (method, path, auth) == ("POST", "/api/2.0/fmapi/endpoints/apply", f"Bearer {ADMIN}")
    assert body == {
        "endpoints": [
            {"name": "emb", "task": "llm/v1/embeddings", "served_entities": [{"model": "minilm"}],
             "limits": {"requests_per_minute": 6000}},
            {"name": "chat", "task": "llm/v1/chat", "served_entities": [{"model": "gemma"}]},
        ],
        "prune": prune,
    }
    assert capsys.readouterr().out.splitlines() == [
        "created  foo", "updated  bar", "unchanged baz", "deleted  qux", "registry version 7"]


@pytest.mark.parametrize(
    "text, why",
    [
        ("endpoints: [name: x\n", "not valid YAML"),
        ("static_replicas: 2\n", "no top-level 'endpoints' list"),
        ("endpoints:\n  name: x\n", "no top-level 'endpoints' list"),
        ("- name: x\n", "no top-level 'endpoints' list"),
        ("endpoints: [x]\n", "must be a mapping"),
    ],
)
def test_apply_refuses_a_bad_file_with_status_2_and_sends_nothing(fmapi, tmp_path, capsys,
                                                                  text, why):
    (tmp_path / "eps.yaml").write_text(text)
    assert fmapi("apply", "-f", "eps.yaml") == 2
    assert why in capsys.readouterr().err
    assert _Api.calls == []


def test_apply_of_a_missing_file_is_a_usage_error(fmapi, capsys):
    assert fmapi("apply", "-f", "missing.yaml") == 2
    assert "cannot read missing.yaml" in capsys.readouterr().err
    assert _Api.calls == []


def test_apply_refused_by_the_server_exits_1(fmapi, tmp_path, capsys):
    (tmp_path / "eps.yaml").write_text(DEV_YAML)
    _Api.routes[("POST", "/api/2.0/fmapi/endpoints/apply")] = (400, {
        "error_code": "INVALID_PARAMETER_VALUE", "message": "endpoints[1].task is unknown"})
    assert fmapi("apply", "-f", "eps.yaml") == 1
    err = capsys.readouterr()
    assert err.out == "" and "400" in err.err and "endpoints[1].task is unknown" in err.err


def test_delete(fmapi, capsys):
    _Api.routes[("DELETE", "/api/2.0/serving-endpoints/chat")] = (200, {})
    assert fmapi("delete", "chat") == 0
    assert _Api.calls == [("DELETE", "/api/2.0/serving-endpoints/chat", f"Bearer {ADMIN}", None)]
    assert capsys.readouterr().out == "deleted chat\n"


def test_delete_of_an_unknown_endpoint_exits_1(fmapi, capsys):
    _Api.routes[("DELETE", "/api/2.0/serving-endpoints/nope")] = NOT_FOUND
    assert fmapi("delete", "nope") == 1
    err = capsys.readouterr()
    assert err.out == "" and "404" in err.err and "does not exist" in err.err


# ---------------------------------------------------------------- limits


def test_limits_show(fmapi, capsys):
    _Api.routes[("GET", "/api/2.0/serving-endpoints/chat")] = (200, CHAT)
    assert fmapi("limits", "show", "chat") == 0
    assert lines(capsys.readouterr().out) == [
        ["KEY", "PRINCIPAL", "REQUESTS/MIN", "TOKENS/MIN", "INPUT", "TOKENS/MIN", "OUTPUT",
         "TOKENS/MIN"],
        ["user", "*", "600", "-", "-", "-"],
        ["endpoint", "*", "-", "10000", "-", "-"],
        ["user", "alice", "100", "5000", "-", "-"],
    ]


def _serve_put():
    _Api.routes[("GET", "/api/2.0/serving-endpoints/chat")] = (200, CHAT)
    _Api.routes[("PUT", "/api/2.0/serving-endpoints/chat/ai-gateway")] = (200, lambda b: b)


def _put_body() -> dict:
    puts = [c for c in _Api.calls if c[0] == "PUT"]
    assert len(puts) == 1 and puts[0][2] == f"Bearer {ADMIN}"
    return puts[0][3]


def test_limits_set_replaces_the_entry_and_keeps_the_rest(fmapi, capsys):
    _serve_put()
    assert fmapi("limits", "set", "chat", "--key", "user", "--principal", "alice",
                 "--calls", "50", "--output-tokens", "900") == 0
    body = _put_body()
    assert body == {**GATEWAY, "rate_limits": [
        GATEWAY["rate_limits"][0],
        GATEWAY["rate_limits"][1],
        {"key": "user", "principal": "alice", "calls": 50, "output_tokens": 900,
         "renewal_period": "minute"},
    ]}
    rows = lines(capsys.readouterr().out)
    assert ["user", "alice", "50", "-", "-", "900"] in rows
    assert ["user", "*", "600", "-", "-", "-"] in rows


def test_limits_set_adds_a_new_default_entry(fmapi, capsys):
    _serve_put()
    assert fmapi("limits", "set", "chat", "--key", "service_principal", "--tokens", "7") == 0
    assert _put_body()["rate_limits"][-1] == {
        "key": "service_principal", "tokens": 7, "renewal_period": "minute"}
    assert len(_put_body()["rate_limits"]) == 4
    assert ["service_principal", "*", "-", "7", "-", "-"] in lines(capsys.readouterr().out)


def test_limits_set_endpoint_key_replaces_the_endpoint_limit(fmapi):
    _serve_put()
    assert fmapi("limits", "set", "chat", "--key", "endpoint", "--input-tokens", "0",
                 "--calls", "10") == 0
    assert _put_body()["rate_limits"][1] == {
        "key": "endpoint", "calls": 10, "input_tokens": 0, "renewal_period": "minute"}


def test_limits_remove(fmapi, capsys):
    _serve_put()
    assert fmapi("limits", "set", "chat", "--key", "user", "--remove") == 0
    # Only the every-user default went: alice's own limit stays.
    assert _put_body()["rate_limits"] == GATEWAY["rate_limits"][1:]
    assert ["user", "*", "600", "-", "-", "-"] not in lines(capsys.readouterr().out)


def test_limits_remove_of_an_absent_entry_sends_no_put(fmapi, capsys):
    _serve_put()
    assert fmapi("limits", "set", "chat", "--key", "user", "--principal", "bob",
                 "--remove") == 1
    assert "no rate limit for user bob" in capsys.readouterr().err
    assert [c[0] for c in _Api.calls] == ["GET"]


def test_limits_set_on_an_endpoint_without_ai_gateway(fmapi):
    _Api.routes[("GET", "/api/2.0/serving-endpoints/emb")] = (200, BARE)
    _Api.routes[("PUT", "/api/2.0/serving-endpoints/emb/ai-gateway")] = (200, lambda b: b)
    assert fmapi("limits", "set", "emb", "--key", "user", "--calls", "5") == 0
    assert [c[3] for c in _Api.calls if c[0] == "PUT"] == [
        {"rate_limits": [{"key": "user", "calls": 5, "renewal_period": "minute"}]}]


@pytest.mark.parametrize(
    "argv, why",
    [
        (["--key", "endpoint", "--principal", "alice", "--calls", "1"], "--principal"),
        (["--key", "user"], "at least one of"),
        (["--key", "user", "--calls", "1", "--remove"], "--remove takes no"),
    ],
)
def test_limits_set_usage_errors_exit_2_and_send_nothing(fmapi, capsys, argv, why):
    _serve_put()
    assert fmapi("limits", "set", "chat", *argv) == 2
    assert why in capsys.readouterr().err
    assert _Api.calls == []


def test_limits_set_rejects_negative_values(fmapi, capsys):
    with pytest.raises(SystemExit) as exc:
        fmapi("limits", "set", "chat", "--key", "user", "--calls", "-1")
    assert exc.value.code == 2
    assert "must be 0 (unlimited) or more" in capsys.readouterr().err
    assert _Api.calls == []


def test_limits_set_refused_by_the_server_exits_1(fmapi, capsys):
    _Api.routes[("GET", "/api/2.0/serving-endpoints/chat")] = (200, CHAT)
    _Api.routes[("PUT", "/api/2.0/serving-endpoints/chat/ai-gateway")] = (400, {
        "error_code": "INVALID_PARAMETER_VALUE", "message": "rate_limits[3].calls too large"})
    assert fmapi("limits", "set", "chat", "--key", "user", "--calls", "5") == 1
    err = capsys.readouterr()
    assert err.out == "" and "400" in err.err and "rate_limits[3].calls too large" in err.err
