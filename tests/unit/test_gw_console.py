"""The web console's static files, in-process: served without an identity under /console/ with
the strict CSP, nothing outside the console directory reachable, the API still guarded; and the
auth rule that lets a browser load the page without a token."""

from __future__ import annotations

import pytest

from fmapi.routing.v1 import routing_pb2 as pb
from fmapi_auth.extauthz import Access, Rule, classify
from fmapi_gateway import console, serving_endpoints
from helpers.gateway_app import app_client, unreachable_config



@pytest.fixture
async def client(tmp_path):
    site = tmp_path / "console"
    (site / "js").mkdir(parents=True)
    (site / "index.html").write_text("<!doctype html><title>x</title>")
    (site / "js" / "main.js").write_text("export const x = 1;\n")
    (site / ".secret.js").write_text("HIDDEN-CONTENT")
    (site / "notes.md").write_text("not a served type")
    (tmp_path / "outside.js").write_text("OUTSIDE-CONTENT")
    async with app_client(unreachable_config(console_dir=str(site))) as c:
        yield c


async def test_the_page_and_its_modules_need_no_identity_and_carry_the_csp(client):
    r = await client.get("/console/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                      "connect-src 'self'", "frame-ancestors 'none'", "form-action 'none'",
                      "require-trusted-types-for 'script'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    js = await client.get("/console/js/main.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert js.headers["content-security-policy"] == csp
    # Revalidation: the same bytes are a 304.
    again = await client.get("/console/js/main.js", headers={"if-none-match": js.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    head = await client.head("/console/index.html")
    assert head.status_code == 200 and head.content == b""


async def test_bare_prefix_redirects_relatively(client):
    r = await client.get("/console")
    assert r.status_code == 308 and r.headers["location"] == "/console/"


@pytest.mark.parametrize("path", ["/console/.secret.js", "/console/notes.md", "/console/nope.js",
                                  "/console/../outside.js", "/console/%2e%2e/outside.js",
                                  "/console/js/../../outside.js"])
async def test_only_the_console_files_are_served(client, path):
    r = await client.get(path)
    # (A client may resolve the dots itself: then it is an API path, which needs a token.)
    assert r.status_code in (401, 404), path
    assert "OUTSIDE-CONTENT" not in r.text and "HIDDEN-CONTENT" not in r.text


async def test_writes_are_refused_and_the_api_still_needs_an_identity(client):
    r = await client.post("/console/index.html", content=b"x")
    assert r.status_code == 405
    r = await client.get("/v1/models")
    assert r.status_code == 401
    r = await client.get("/consolex")
    assert r.status_code == 401


def test_the_repository_console_is_found():
    files = console.index_files(console.default_directory())
    assert "/index.html" in files and "/js/main.js" in files and "/css/console.css" in files


@pytest.mark.parametrize(
    ("method", "path", "rule"),
    [
        ("GET", "/console", Rule(Access.PUBLIC)),
        ("GET", "/console/", Rule(Access.PUBLIC)),
        ("HEAD", "/console/js/main.js", Rule(Access.PUBLIC)),
        ("GET", "//console//css/console.css", Rule(Access.PUBLIC)),
        ("POST", "/console/", Rule(Access.TOKEN)),
        ("GET", "/consolex", Rule(Access.TOKEN)),
        ("GET", "/v1/console/", Rule(Access.TOKEN)),
    ],
)
def test_auth_lets_only_reads_of_the_console_through_without_a_token(method, path, rule):
    assert classify(method, path) == rule


def test_served_entities_count_the_live_replicas_that_take_the_endpoints_traffic():
    shared = pb.Replica(id="r1", models=["m"])
    dedicated = pb.Replica(id="r2", models=["m"], dedicated_endpoint="pt")
    ppt = pb.Endpoint(name="ppt", served_entities=[pb.ServedEntity(name="m", model="m")])
    pt = pb.Endpoint(name="pt", served_entities=[pb.ServedEntity(name="m", model="m")],
                     capacity_mode=pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT)
    replicas = {"m": [shared, dedicated, pb.Replica(id="r3", models=["m"])]}

    def count(body):
        return body["config"]["served_entities"][0]["live_replicas"]

    assert count(serving_endpoints.render(ppt, True, replicas)) == 2
    assert count(serving_endpoints.render(pt, True, replicas)) == 1
    assert count(serving_endpoints.render(ppt, False, {})) == 0
    plain = serving_endpoints.render(ppt, True)
    assert "live_replicas" not in plain["config"]["served_entities"][0]
