"""`fmapi usage` against a stand-in REST server: the query it sends, its table, CSV and JSON, and
its errors."""

from __future__ import annotations

import csv
import io
import json
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import pytest

from fmapi_cli import tokens
from fmapi_cli.main import main
from helpers.standin_http import send_json, serving

ADMIN = "admin-secret"
# What GET /api/2.0/usage answers (gateway/fmapi_gateway/usage_api.py), grouped two ways.
USAGE = {
    "since": "2026-11-18T12:00:00+00:00", "until": "2026-11-25T12:00:00+00:00",
    "by": ["endpoint", "principal"], "principal": None,
    "groups": [
        {"endpoint": "all-minilm-l6-v2", "principal": "alice@example.com", "requests": 1200,
         "input_tokens": 45000, "output_tokens": 0, "input_characters": 190000,
         "output_characters": 0},
        {"endpoint": "tiny-chat", "principal": "svc-reports", "requests": 7,
         "input_tokens": 310, "output_tokens": 1234567, "input_characters": 1500,
         "output_characters": 5000000},
    ],
}


class _Api(BaseHTTPRequestHandler):
    calls: list = []
    reply: tuple = (200, USAGE)

    def do_GET(self):  # noqa: N802
        url = urlsplit(self.path)
        self.calls.append((url.path, parse_qs(url.query, keep_blank_values=True),
                           self.headers.get("authorization")))
        status, body = self.reply
        send_json(self, status, body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    with serving(_Api) as url:
        yield url


@pytest.fixture
def fmapi(server, monkeypatch, tmp_path):
    """Run `fmapi usage ...` against the stand-in, with the admin token."""
    _Api.calls, _Api.reply = [], (200, USAGE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tokens, "REPO_DEV_TOKEN_FILE", tmp_path / "absent")
    monkeypatch.delenv("FMAPI_TOKEN", raising=False)

    def run(*argv):
        return main(["usage", *argv, "--url", server, "--token", ADMIN])

    return run


def _sent() -> tuple[str, dict, str]:
    ((path, query, auth),) = _Api.calls
    return path, query, auth


def test_table_by_endpoint_and_principal_over_seven_days(fmapi, capsys):
    assert fmapi("--since", "7d", "--by", "endpoint,principal") == 0
    assert _sent() == ("/api/2.0/usage", {"since": ["7d"], "by": ["endpoint,principal"]},
                       f"Bearer {ADMIN}")
    out = capsys.readouterr()
    lines = out.out.splitlines()
    header = lines[0]
    columns = ["ENDPOINT", "PRINCIPAL", "REQUESTS", "INPUT TOKENS", "OUTPUT TOKENS",
               "INPUT CHARACTERS", "OUTPUT CHARACTERS"]
    assert [c.strip() for c in header.split("  ") if c.strip()] == columns
    assert lines[1].split() == ["all-minilm-l6-v2", "alice@example.com", "1200", "45000", "0",
                                "190000", "0"]
    assert lines[2].split() == ["tiny-chat", "svc-reports", "7", "310", "1234567", "1500",
                                "5000000"]
    assert len(lines) == 3
    # Every value starts under its column's name.
    starts = [header.index(c) for c in columns]
    for line, values in zip(lines[1:], (USAGE["groups"][0], USAGE["groups"][1])):
        cells = [str(values[k]) for k in ("endpoint", "principal", "requests", "input_tokens",
                                          "output_tokens", "input_characters",
                                          "output_characters")]
        assert [line.index(cell, start) for cell, start in zip(cells, starts)] == starts, line
    # The window and whose usage it is go to stderr (stdout stays the table).
    assert out.err.strip() == (
        "2026-11-18T12:00:00+00:00 .. 2026-11-25T12:00:00+00:00 (everyone)")


def test_json_prints_the_response_as_it_came(fmapi, capsys):
    assert fmapi("--since", "7d", "--by", "endpoint,principal", "--format", "json") == 0
    assert _sent()[1] == {"since": ["7d"], "by": ["endpoint,principal"]}
    out = capsys.readouterr()
    assert json.loads(out.out) == USAGE and out.err == ""


def test_csv_has_a_header_and_a_row_per_group(fmapi, capsys):
    assert fmapi("--since", "7d", "--by", "endpoint,principal", "--format", "csv") == 0
    got = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert got[0] == ["endpoint", "principal", "requests", "input_tokens", "output_tokens",
                      "input_characters", "output_characters"]
    assert got[1:] == [["all-minilm-l6-v2", "alice@example.com", "1200", "45000", "0", "190000",
                        "0"],
                       ["tiny-chat", "svc-reports", "7", "310", "1234567", "1500", "5000000"]]


def test_a_caller_s_own_usage_says_whose_and_until_is_sent(fmapi, capsys):
    _Api.reply = (200, {**USAGE, "principal": "alice@example.com", "groups": USAGE["groups"][:1]})
    assert fmapi("--since", "7d", "--until", "1d", "--by", "endpoint,principal") == 0
    assert _sent()[1] == {"since": ["7d"], "until": ["1d"], "by": ["endpoint,principal"]}
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 2
    assert out.err.strip().endswith("(principal alice@example.com)")


def test_no_usage_is_a_header_alone(fmapi, capsys):
    _Api.reply = (200, {**USAGE, "groups": []})
    assert fmapi("--since", "7d", "--by", "endpoint,principal") == 0
    assert capsys.readouterr().out.split() == [
        "ENDPOINT", "PRINCIPAL", "REQUESTS", "INPUT", "TOKENS", "OUTPUT", "TOKENS", "INPUT",
        "CHARACTERS", "OUTPUT", "CHARACTERS"]


def test_a_refused_query_prints_the_server_s_message_and_exits_1(fmapi, capsys):
    _Api.reply = (400, {"error_code": "INVALID_PARAMETER_VALUE",
                        "message": "'by' may name endpoint, principal, token, day, not 'colour'"})
    assert fmapi("--since", "7d", "--by", "colour") == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert "400" in out.err and "not 'colour'" in out.err and out.err.startswith("fmapi usage:")
