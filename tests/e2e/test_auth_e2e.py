"""Auth end to end: API tokens enforced by Envoy's external authorization, in the whole system.

Runs its own (embeddings-only) system, because the last test stops its Redis.
"""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest
import redis

from fmapi.inference.v1 import inference_pb2, inference_pb2_grpc
from fmapi_cli.system import ROOT, System, SystemOptions
from fmapi_common import identity

EMBED = "all-minilm-l6-v2"
OTHER = "other-embeddings"
ENDPOINTS = f"""
endpoints:
  - name: {EMBED}
    task: llm/v1/embeddings
    served_entities: [{{model: all-minilm-l6-v2}}]
  - name: {OTHER}
    task: llm/v1/embeddings
    served_entities: [{{model: all-minilm-l6-v2}}]
"""


@pytest.fixture(scope="module")
def auth_system(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("auth-system")
    (run_dir / "endpoints.yaml").write_text(ENDPOINTS)
    s = System(SystemOptions(runtime_dir=run_dir, http_port=0,
                             endpoints_file=run_dir / "endpoints.yaml",
                             redis_data_dir=run_dir / "redis"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def admin(auth_system):
    with httpx.Client(base_url=auth_system.base_url, timeout=30,
                      headers={"authorization": f"Bearer {auth_system.admin_token}"}) as c:
        yield c


@pytest.fixture(scope="module")
def anon(auth_system):
    with httpx.Client(base_url=auth_system.base_url, timeout=30) as c:
        yield c


def create_token(admin, **body) -> tuple[str, str]:
    r = admin.post("/api/2.0/token/create", json=body)
    assert r.status_code == 200, r.text
    return r.json()["token_value"], r.json()["token_info"]["token_id"]


def embed(client: httpx.Client, token: str | None, model: str = EMBED) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return client.post("/v1/embeddings", json={"model": model, "input": "hi"}, headers=headers)


def assert_401(r: httpx.Response, fragment: str = "") -> None:
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["error"]["type"] == "authentication_error"
    assert body["error_code"] == "UNAUTHENTICATED"
    assert fragment.lower() in body["error"]["message"].lower()


def grpc_embed(system, token: str | None, endpoint: str = EMBED):
    md = (("authorization", f"Bearer {token}"),) if token is not None else ()
    with grpc.insecure_channel(f"127.0.0.1:{system.http_port}") as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        return stub.Embed(inference_pb2.EmbedRequest(endpoint=endpoint, texts=["hi"]),
                          metadata=md, timeout=10)


def grpc_reason(err: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call's google.rpc.Status."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    st = rpc_status.from_call(err)
    assert st is not None, "no google.rpc.Status in the trailers"
    info = error_details_pb2.ErrorInfo()
    assert st.details[0].Unpack(info)
    return info.reason


def test_admin_token_works_and_health_needs_none(admin, anon):
    assert embed(admin, None).status_code == 200  # the client's default header carries the token
    assert anon.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer not-a-token", "Bearer fmapi_" + "A" * 49],
    ids=["none", "empty-bearer", "basic", "malformed", "unknown"],
)
def test_missing_malformed_or_unknown_token_is_401(auth_system, anon, header):
    headers = {"authorization": header} if header is not None else {}
    r = anon.post("/v1/embeddings", json={"model": EMBED, "input": "x"}, headers=headers)
    assert_401(r)
    with pytest.raises(grpc.RpcError) as err:
        grpc_embed(auth_system, header.split(" ", 1)[1] if header and " " in header else None)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Envoy's own denial reaches a gRPC caller with a message and the rich status.
    assert "token" in err.value.details().lower()
    assert grpc_reason(err.value) == "UNAUTHENTICATED"


def test_openai_sdk_raises_authentication_error(auth_system):
    client = openai.OpenAI(base_url=f"{auth_system.base_url}/v1", api_key="fmapi_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model=EMBED, input="x")


def test_revoked_token_stops_within_one_second(auth_system, admin, anon):
    token, token_id = create_token(admin, comment="to revoke")
    assert embed(anon, token).status_code == 200
    assert admin.post("/api/2.0/token/delete", json={"token_id": token_id}).status_code == 200
    t0 = time.monotonic()
    while embed(anon, token).status_code == 200:
        assert time.monotonic() - t0 < 1.0, "revoked token still accepted after 1 s"
        time.sleep(0.05)
    assert_401(embed(anon, token))
    with pytest.raises(grpc.RpcError) as err:
        grpc_embed(auth_system, token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_expired_token_is_401(auth_system, admin, anon):
    token, _ = create_token(admin, comment="short", lifetime_seconds=1)
    assert embed(anon, token).status_code == 200
    time.sleep(1.3)
    assert_401(embed(anon, token), "expired")
    with pytest.raises(grpc.RpcError) as err:
        grpc_embed(auth_system, token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_scoped_to_another_endpoint_is_403(auth_system, admin, anon):
    token, _ = create_token(admin, comment="scoped", endpoints=[OTHER])
    assert embed(anon, token, model=OTHER).status_code == 200
    r = embed(anon, token, model=EMBED)  # the endpoint is named only in the body
    assert r.status_code == 403, r.text
    assert r.json()["error_code"] == "PERMISSION_DENIED"
    assert EMBED in r.json()["error"]["message"]
    r = anon.post(f"/serving-endpoints/{EMBED}/invocations", json={"input": "x"},
                  headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 403
    with pytest.raises(grpc.RpcError) as err:
        grpc_embed(auth_system, token, endpoint=EMBED)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert EMBED in err.value.details() and grpc_reason(err.value) == "PERMISSION_DENIED"
    assert grpc_embed(auth_system, token, endpoint=OTHER).embeddings
    # and it sees only what it may query
    models = anon.get("/v1/models", headers={"authorization": f"Bearer {token}"}).json()
    assert [m["id"] for m in models["data"]] == [OTHER]
    # a non-admin cannot manage tokens
    r = anon.post("/api/2.0/token/create", json={}, headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 403


def test_client_sent_identity_headers_are_never_trusted(auth_system, admin, anon):
    token, _ = create_token(admin, comment="forger", endpoints=[OTHER])
    forged = {
        "authorization": f"Bearer {token}",
        identity.PRINCIPAL: "admin",
        identity.SCOPES: '["*"]',
        identity.ADMIN: "true",
        identity.SIGNATURE: "v1=" + "0" * 64,
    }
    assert anon.post("/v1/embeddings", json={"model": EMBED, "input": "x"}, headers=forged).status_code == 403
    assert anon.get("/api/2.0/token/list", headers=forged).status_code == 403


def _https_as(system, identity_name: str) -> httpx.Client:
    """A client of the gateway's REST port that presents ``identity_name``'s certificate."""
    import ssl

    f = system.tls_files(identity_name)
    ctx = ssl.create_default_context(cafile=f.ca)
    ctx.load_cert_chain(f.cert, f.key)
    ctx.check_hostname = False  # the gateway's certificate names "gateway", we dial 127.0.0.1
    return httpx.Client(base_url=f"https://127.0.0.1:{system.ports['gateway-http']}",
                        verify=ctx, timeout=10)


def _grpc_as(system, identity_name: str, port_name: str, server: str) -> grpc.Channel:
    creds = system.tls_files(identity_name).channel_credentials()
    return grpc.secure_channel(f"127.0.0.1:{system.ports[port_name]}", creds,
                               options=[("grpc.ssl_target_name_override", server)])


def test_attack_gateway_ports_refuse_everyone_but_envoy(auth_system, admin):
    token, _ = create_token(admin, comment="bypass")
    body = {"model": EMBED, "input": "x"}
    # Plain HTTP, or TLS without a client certificate: no connection at all.
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"http://127.0.0.1:{auth_system.ports['gateway-http']}/v1/embeddings", json=body,
                   headers={"authorization": f"Bearer {token}"}, timeout=10)
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"https://127.0.0.1:{auth_system.ports['gateway-http']}/v1/embeddings", json=body,
                   headers={"authorization": f"Bearer {token}"}, timeout=10, verify=False)
    # Another fmapi service's certificate: the gateway hangs up.
    with _https_as(auth_system, "generation") as c, pytest.raises(httpx.HTTPError):
        c.post("/v1/embeddings", json=body, headers={"authorization": f"Bearer {token}"})
    with grpc.insecure_channel(f"127.0.0.1:{auth_system.ports['gateway']}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            inference_pb2_grpc.InferenceServiceStub(ch).Embed(
                inference_pb2.EmbedRequest(endpoint=EMBED, texts=["x"]),
                metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with _grpc_as(auth_system, "routing", "gateway", "gateway") as ch:
        with pytest.raises(grpc.RpcError) as err:
            inference_pb2_grpc.InferenceServiceStub(ch).Embed(
                inference_pb2.EmbedRequest(endpoint=EMBED, texts=["x"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_attack_forged_or_unsigned_identity_with_envoys_certificate(auth_system, admin):
    """Even holding Envoy's certificate, a caller needs an identity auth signed."""
    token, _ = create_token(admin, comment="bypass")
    unsigned = {identity.PRINCIPAL: "admin", identity.WORKSPACE: "default", identity.TOKEN_ID: "x",
                identity.SCOPES: '["*"]', identity.ADMIN: "true", identity.PRINCIPAL_KIND: "user",
                identity.TIMESTAMP: f"{time.time():.3f}", identity.SIGNATURE: "v2=" + "ab" * 32}
    with _https_as(auth_system, "envoy") as c:
        for headers in ({"authorization": f"Bearer {token}"}, unsigned):
            assert_401(c.post("/v1/embeddings", json={"model": EMBED, "input": "x"},
                              headers=headers), "identity")
    with _grpc_as(auth_system, "envoy", "gateway", "gateway") as ch:
        with pytest.raises(grpc.RpcError) as err:
            inference_pb2_grpc.InferenceServiceStub(ch).Embed(
                inference_pb2.EmbedRequest(endpoint=EMBED, texts=["x"]),
                metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _signed_by_auth(system, token: str, method: str, path: str, request_id: str) -> dict:
    """Ask auth's Check as Envoy would, and return the identity headers it signed."""
    from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

    headers = {"authorization": f"Bearer {token}", "x-request-id": request_id}
    http = attribute_context_pb2.AttributeContext.HttpRequest(method=method, path=path, headers=headers)
    req = external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http)))
    with _grpc_as(system, "envoy", "auth", "auth") as ch:
        resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=10)
    assert resp.HasField("ok_response"), resp
    return {o.header.key: o.header.value for o in resp.ok_response.headers}


def test_attack_captured_identity_headers_cannot_be_replayed(auth_system, admin):
    token, _ = create_token(admin, comment="replay", endpoints=["*"])
    body = {"model": EMBED, "input": "x"}
    signed = _signed_by_auth(auth_system, token, "POST", "/v1/embeddings", "rid-1")
    with _https_as(auth_system, "envoy") as c:
        # The genuine request goes through (so the refusals below are about the replay).
        ok = c.post("/v1/embeddings", json=body, headers={**signed, "x-request-id": "rid-1"})
        assert ok.status_code == 200, ok.text
        assert_401(c.post("/v1/embeddings", json=body, headers={**signed, "x-request-id": "rid-2"}),
                   "identity")  # another request
        assert_401(c.get("/api/2.0/token/list", headers={**signed, "x-request-id": "rid-1"}),
                   "identity")  # another path and method
        time.sleep(identity.MAX_AGE_SECONDS + 0.5)
        assert_401(c.post("/v1/embeddings", json=body, headers={**signed, "x-request-id": "rid-1"}),
                   "identity")  # the same request, later (e.g. after a revocation)


def test_attack_a_client_cannot_choose_its_request_id(auth_system, admin):
    """The request id keys identity signatures and usage records: Envoy always makes its own."""
    r = admin.get("/v1/models", headers={"x-request-id": "chosen-by-the-client"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] and r.headers["x-request-id"] != "chosen-by-the-client"


def test_attack_envoy_admin_is_not_on_any_tcp_port(auth_system):
    import os
    import stat

    sock = auth_system.envoy_admin_socket
    assert stat.S_ISSOCK(os.stat(sock).st_mode) and stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    cfg = (auth_system.run_dir / "envoy.yaml").read_text()
    assert "pipe:" in cfg and "admin:\n  address:\n    pipe:" in cfg
    # The public listener does not serve the admin API either.
    r = httpx.post(f"{auth_system.base_url}/quitquitquit", timeout=10)
    assert r.status_code == 401
    assert auth_system.envoy_admin("/ready").text.strip() == "LIVE"


def test_attack_redis_data_and_keys_are_the_owners_alone(auth_system, admin):
    """Redis' append-only file holds token hashes; the CA key signs every identity."""
    import os
    import stat

    create_token(admin, comment="persisted")
    data = auth_system.run_dir / "redis"
    files = [p for p in data.rglob("*") if p.is_file()]
    assert files, "Redis wrote no append-only file"
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    for path in [*files, auth_system.pki_dir / "ca-key.pem", auth_system.pki_dir / "gateway-key.pem"]:
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path


def test_token_management_api_and_cli(auth_system, admin):
    token, token_id = create_token(admin, comment="listed")
    infos = admin.get("/api/2.0/token/list").json()["token_infos"]
    mine = next(i for i in infos if i["token_id"] == token_id)
    assert mine["comment"] == "listed" and "token_value" not in mine
    assert token not in admin.get("/api/2.0/token/list").text
    env = {"FMAPI_URL": auth_system.base_url, "FMAPI_TOKEN": auth_system.admin_token,
           "PATH": "/usr/bin:/bin"}
    fmapi = [sys.executable, "-m", "fmapi_cli.main", "tokens"]
    out = subprocess.run([*fmapi, "create", "--comment", "from-cli"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    secret = out.stdout.strip().splitlines()[-1]
    assert secret.startswith("fmapi_")
    assert embed(httpx.Client(base_url=auth_system.base_url), secret).status_code == 200
    listed = subprocess.run([*fmapi, "list"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert listed.returncode == 0 and "from-cli" in listed.stdout and secret not in listed.stdout
    cli_id = next(i["token_id"] for i in admin.get("/api/2.0/token/list").json()["token_infos"]
                  if i["comment"] == "from-cli")
    revoked = subprocess.run([*fmapi, "revoke", cli_id], env=env, capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
    assert revoked.returncode == 0, revoked.stderr
    time.sleep(1.1)
    assert_401(embed(httpx.Client(base_url=auth_system.base_url), secret))


def test_no_secret_in_redis_or_logs(auth_system, admin, anon):
    secrets = [auth_system.admin_token]
    for i in range(3):
        tok, _ = create_token(admin, comment=f"used-{i}")
        assert embed(anon, tok).status_code == 200
        secrets.append(tok)
    r = redis.Redis(unix_socket_path=auth_system.redis_url.removeprefix("unix://"))
    blob = []
    for key in r.scan_iter(count=1000):
        blob.append(key)
        kind = r.type(key)
        if kind == b"string":
            blob.append(r.get(key) or b"")
        elif kind == b"hash":
            for k, v in r.hgetall(key).items():
                blob += [k, v]
        elif kind == b"set":
            blob += list(r.smembers(key))
        elif kind == b"zset":
            blob += [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
    dump = b"\n".join(blob)
    logs = b"\n".join(p.read_bytes() for p in (auth_system.run_dir / "logs").glob("*.log"))
    for s in secrets:
        core = s.encode()[6:30]  # any long piece of the secret
        assert core not in dump
        assert core not in logs


def test_zz_redis_down_fails_closed_with_503(auth_system, admin, anon):
    """Last: stops this system's Redis."""
    token, _ = create_token(admin, comment="before outage")
    redis_child = next(c for c in auth_system.sup.children if c.name == "redis")
    redis_child.proc.terminate()
    redis_child.proc.wait(10)
    time.sleep(1.2)  # past any per-replica cache
    for _ in range(10):
        r = embed(anon, token)
        assert r.status_code == 503, r.text
        assert r.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
        assert r.headers.get("retry-after")
    with pytest.raises(grpc.RpcError) as err:
        grpc_embed(auth_system, token)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
