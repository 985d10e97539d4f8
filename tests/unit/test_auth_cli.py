"""`fmapi tokens` against a stand-in REST server: request shapes, output, errors, token lookup."""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler

import pytest

from fmapi_cli import tokens as cli
from helpers.standin_http import send_json, serving

SECRET = "fmapi_" + "A" * 49


class _Api(BaseHTTPRequestHandler):
    calls: list = []

    def _reply(self, status: int, body: dict) -> None:
        send_json(self, status, body)

    def _handle(self):
        n = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        self.calls.append((self.command, self.path, self.headers.get("authorization"), body))
        if self.headers.get("authorization") != "Bearer admin-secret":
            return self._reply(401, {"error_code": "UNAUTHENTICATED", "message": "bad token",
                                     "error": {"message": "bad token"}})
        if self.path == "/api/2.0/token/create":
            return self._reply(200, {"token_value": SECRET, "token_info": {
                "token_id": "t1", "creation_time": 1_700_000_000_000, "expiry_time": -1,
                "comment": body.get("comment", "")}})
        if self.path == "/api/2.0/token/list":
            return self._reply(200, {"token_infos": [{
                "token_id": "t1", "comment": "ci", "creation_time": 1_700_000_000_000,
                "expiry_time": -1, "principal": "svc", "endpoints": ["chat-*"], "admin": False,
                "last_used_time": None}]})
        if self.path == "/api/2.0/token/delete":
            if body["token_id"] != "t1":
                return self._reply(404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                                         "message": "token 'x' does not exist"})
            return self._reply(200, {})
        return self._reply(404, {"message": "no route"})

    do_GET = do_POST = _handle

    def log_message(self, *a):
        pass


@pytest.fixture
def api():
    _Api.calls = []
    with serving(_Api) as url:
        yield url


def run(argv, monkeypatch, tmp_path, env=None):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "REPO_DEV_TOKEN_FILE", tmp_path / "absent")
    monkeypatch.delenv("FMAPI_TOKEN", raising=False)
    monkeypatch.delenv("FMAPI_URL", raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_create_prints_secret_alone_on_stdout(api, monkeypatch, tmp_path, capsys):
    rc = run(["tokens", "create", "--url", api, "--token", "admin-secret", "--comment", "ci",
              "--lifetime-seconds", "60", "--principal", "svc", "--service-principal",
              "--endpoint", "chat-*", "--endpoint", "embed"], monkeypatch, tmp_path)
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == SECRET + "\n"
    assert "t1" in err and SECRET not in err
    method, path, auth, body = _Api.calls[-1]
    assert (method, path, auth) == ("POST", "/api/2.0/token/create", "Bearer admin-secret")
    assert body == {"comment": "ci", "lifetime_seconds": 60, "principal": "svc",
                    "principal_kind": "service_principal", "endpoints": ["chat-*", "embed"]}


def test_token_from_env_then_dev_file(api, monkeypatch, tmp_path, capsys):
    assert run(["tokens", "list", "--url", api], monkeypatch, tmp_path,
               env={"FMAPI_TOKEN": "admin-secret"}) == 0
    (tmp_path / ".fmapi").mkdir()
    (tmp_path / ".fmapi" / "dev-token").write_text("admin-secret\n")
    assert run(["tokens", "list", "--json"], monkeypatch, tmp_path, env={"FMAPI_URL": api}) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("["):])[0]["token_id"] == "t1"
    assert _Api.calls[-1][:3] == ("GET", "/api/2.0/token/list", "Bearer admin-secret")


def test_list_table(api, monkeypatch, tmp_path, capsys):
    assert run(["tokens", "list", "--url", api, "--token", "admin-secret"], monkeypatch,
               tmp_path) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["TOKEN", "ID"]
    assert out[1].split()[:5] == ["t1", "ci", "svc", "chat-*", "no"]


def test_revoke_and_errors(api, monkeypatch, tmp_path, capsys):
    assert run(["tokens", "revoke", "t1", "--url", api, "--token", "admin-secret"], monkeypatch,
               tmp_path) == 0
    assert _Api.calls[-1][3] == {"token_id": "t1"}
    assert run(["tokens", "revoke", "x", "--url", api, "--token", "admin-secret"], monkeypatch,
               tmp_path) == 1
    assert "does not exist" in capsys.readouterr().err
    assert run(["tokens", "list", "--url", api, "--token", "wrong"], monkeypatch, tmp_path) == 1
    assert "401" in capsys.readouterr().err


def test_no_token_anywhere(monkeypatch, tmp_path, capsys):
    assert run(["tokens", "list", "--url", "http://127.0.0.1:9"], monkeypatch, tmp_path) == 1
    assert "no API token" in capsys.readouterr().err


def test_unreachable(monkeypatch, tmp_path, capsys):
    assert run(["tokens", "list", "--url", "http://127.0.0.1:9", "--token", "t", "--timeout",
                "2"], monkeypatch, tmp_path) == 1
    assert "cannot reach" in capsys.readouterr().err
