"""The auth service as a process: real redis-server, ``python -m fmapi_auth`` on port 0, real gRPC.

Covers token management, Envoy's Check (401/403/503, identity headers, gRPC denials), revocation
across two replicas within a second, expiry, the bootstrap admin token, and that no secret ever
reaches Redis or a log line. The last part runs a real Envoy in front of auth to check that Envoy
does what the Check responses ask (header removal/overwrite, gRPC status on denial).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import redis
import yaml
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from helpers import tls
from helpers.redis_server import RedisServer

from google.rpc import error_details_pb2, status_pb2

from fmapi.auth.v1 import auth_pb2, auth_pb2_grpc
from fmapi_auth.tokens import hash_secret, is_well_formed
from fmapi_cli.system import envoy_upstream_tls
from fmapi_common import identity as ident
from fmapi_common import pki

ROOT = Path(__file__).resolve().parents[2]
KEY_HEX = "5e" * 32
KEY = bytes.fromhex(KEY_HEX)


# ---------------------------------------------------------------- processes


class AuthProcess:
    """``python -m fmapi_auth`` with its own log file, on port 0."""

    def __init__(self, workdir: Path, redis_url: str, name: str = "auth", **env: str) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.redis_url = redis_url
        self.extra_env = env
        self.port_file = self.dir / f"{name}.port"
        self.log_path = self.dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.channel: grpc.aio.Channel | None = None

    def start(self, timeout: float = 30.0) -> AuthProcess:
        self.port_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            "FMAPI_AUTH_REDIS_URL": self.redis_url,
            "FMAPI_AUTH_IDENTITY_KEY": KEY_HEX,
            "FMAPI_AUTH_PORT_FILE": str(self.port_file),
            "FMAPI_AUTH_LOG_LEVEL": "DEBUG",  # the secret must stay out of even debug logs
            **tls.env("FMAPI_AUTH_", "auth"),
            **self.extra_env,
        }
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fmapi_auth"], env=env, stdout=log, stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log()[-3000:]}")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())
        # Token management is the gateway's; Check is Envoy's: each has its own identity.
        self.channel = tls.aio_channel(self.address, "gateway", "auth")
        self.envoy_channel = tls.aio_channel(self.address, "envoy", "auth")
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def auth(self) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self.channel)

    @property
    def authz(self) -> external_auth_pb2_grpc.AuthorizationStub:
        return external_auth_pb2_grpc.AuthorizationStub(self.envoy_channel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            await self.envoy_channel.close()
            self.channel = None
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
async def replicas(redis_srv, tmp_path_factory):
    """Two auth replicas on the same Redis."""
    d = tmp_path_factory.mktemp("auth")
    a = AuthProcess(d, redis_srv.url, "auth-a").start()
    b = AuthProcess(d, redis_srv.url, "auth-b").start()
    yield a, b
    await a.stop()
    await b.stop()


# ---------------------------------------------------------------- helpers


SECRETS: list[str] = []  # every secret these tests saw, for the leak check


async def create(proc: AuthProcess, *, endpoints=("*",), admin=False, lifetime=0,
                 principal="alice", kind=auth_pb2.PRINCIPAL_KIND_USER, name="test"):
    resp = await proc.auth.CreateToken(
        auth_pb2.CreateTokenRequest(
            name=name,
            owner=auth_pb2.Principal(id=principal, kind=kind, workspace="ws1"),
            scopes=auth_pb2.Scopes(endpoints=list(endpoints), admin=admin),
            lifetime_seconds=lifetime,
        ),
        timeout=5,
    )
    SECRETS.append(resp.secret)
    return resp


def check_request(path: str, headers: dict[str, str], method: str = "POST"):
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=method, path=path, host="fmapi", scheme="http", protocol="HTTP/1.1",
        headers={":path": path, ":method": method, **headers},
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


async def check(proc: AuthProcess, path="/serving-endpoints/chat-a/invocations", token=None,
                headers=None, method="POST"):
    h = dict(headers or {})
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    return await proc.authz.Check(check_request(path, h, method), timeout=5)


def denied_status(resp) -> int | None:
    return resp.denied_response.status.code if resp.HasField("denied_response") else None


def ok_headers(resp) -> dict[str, str]:
    assert resp.HasField("ok_response"), resp
    assert resp.status.code == 0
    return {o.header.key: o.header.value for o in resp.ok_response.headers}


def assert_denied(resp, status: int, error_code: str, text: str = ""):
    assert not resp.HasField("ok_response"), resp
    assert resp.status.code != 0
    assert denied_status(resp) == status, resp
    headers = {o.header.key: o.header.value for o in resp.denied_response.headers}
    assert headers["content-type"] == "application/json"
    body = json.loads(resp.denied_response.body)
    assert body["error_code"] == error_code
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] is None or isinstance(body["error"]["param"], str)
    assert text.lower() in body["message"].lower()
    return body, headers


# ---------------------------------------------------------------- token management


async def test_create_list_revoke(replicas):
    a, b = replicas
    resp = await create(a, endpoints=("chat-*",), name="ci", lifetime=3600,
                        principal="svc-ci", kind=auth_pb2.PRINCIPAL_KIND_SERVICE_PRINCIPAL)
    assert is_well_formed(resp.secret)
    info = resp.info
    assert info.id and info.name == "ci" and info.prefix == resp.secret[:10]
    assert info.owner.kind == auth_pb2.PRINCIPAL_KIND_SERVICE_PRINCIPAL
    assert list(info.scopes.endpoints) == ["chat-*"] and not info.scopes.admin
    assert 3599 <= info.expire_time.seconds - info.create_time.seconds <= 3600

    listed = (await b.auth.ListTokens(auth_pb2.ListTokensRequest(), timeout=5)).tokens
    mine = [t for t in listed if t.id == info.id]
    assert len(mine) == 1
    assert mine[0].owner.id == "svc-ci" and mine[0].owner.workspace == "ws1"
    # Metadata only: no secret anywhere in the listing.
    assert resp.secret not in str(listed) and resp.secret[6:20] not in str(listed)

    only = (
        await a.auth.ListTokens(auth_pb2.ListTokensRequest(owner_id="svc-ci"), timeout=5)
    ).tokens
    assert [t.id for t in only] == [info.id]
    assert not (await a.auth.ListTokens(
        auth_pb2.ListTokensRequest(workspace="nope"), timeout=5)).tokens

    await a.auth.RevokeToken(auth_pb2.RevokeTokenRequest(id=info.id), timeout=5)
    listed = (await b.auth.ListTokens(auth_pb2.ListTokensRequest(), timeout=5)).tokens
    assert info.id not in {t.id for t in listed}
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await a.auth.RevokeToken(auth_pb2.RevokeTokenRequest(id=info.id), timeout=5)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_create_validates(replicas):
    a, _ = replicas
    for req in (
        auth_pb2.CreateTokenRequest(owner=auth_pb2.Principal(id="")),
        auth_pb2.CreateTokenRequest(owner=auth_pb2.Principal(id="a b")),
        auth_pb2.CreateTokenRequest(owner=auth_pb2.Principal(id="a"), lifetime_seconds=-5),
        auth_pb2.CreateTokenRequest(
            owner=auth_pb2.Principal(id="a"), scopes=auth_pb2.Scopes(endpoints=["x y"])),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await a.auth.CreateToken(req, timeout=5)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_authenticate_and_last_used(replicas):
    a, b = replicas
    resp = await create(a, endpoints=("x",))
    assert not resp.info.HasField("last_used_time")
    got = await b.auth.Authenticate(auth_pb2.AuthenticateRequest(secret=resp.secret), timeout=5)
    assert got.info.id == resp.info.id
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        listed = (await a.auth.ListTokens(auth_pb2.ListTokensRequest(), timeout=5)).tokens
        (t,) = [t for t in listed if t.id == resp.info.id]
        if t.HasField("last_used_time"):
            break
        await asyncio.sleep(0.05)
    assert t.HasField("last_used_time")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await b.auth.Authenticate(auth_pb2.AuthenticateRequest(secret="fmapi_nope"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------- Check


async def test_health_needs_no_token_and_strips_client_identity(replicas):
    a, _ = replicas
    resp = await check(a, "/healthz", headers={"x-fmapi-principal": "mallory"}, method="GET")
    assert ok_headers(resp) == {}
    assert list(resp.ok_response.headers_to_remove) == ["x-fmapi-principal"]


async def test_missing_token_401(replicas):
    a, _ = replicas
    body, headers = assert_denied(await check(a), 401, "UNAUTHENTICATED", "missing")
    assert body["error"]["type"] == "authentication_error"
    assert headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "fmapi_x", "Token fmapi_x"]
)
async def test_malformed_header_401(replicas, value):
    a, _ = replicas
    assert_denied(await check(a, headers={"authorization": value}), 401, "UNAUTHENTICATED",
                  "malformed")


async def test_malformed_and_unknown_token_401(replicas):
    a, _ = replicas
    real = (await create(a)).secret
    assert_denied(await check(a, token=real[:-1]), 401, "UNAUTHENTICATED", "malformed")
    assert_denied(await check(a, token="dapi0123456789abcdef"), 401, "UNAUTHENTICATED")
    from fmapi_auth.tokens import generate_secret

    assert_denied(await check(a, token=generate_secret()), 401, "UNAUTHENTICATED", "unknown")


async def test_allowed_sets_signed_identity_and_drops_client_headers(replicas):
    a, _ = replicas
    resp = await create(a, endpoints=("chat-*", "embed"), principal="bob")
    r = await check(a, token=resp.secret, headers={
        "x-fmapi-principal": "mallory",
        "x-fmapi-admin": "true",
        "x-fmapi-smuggled": "1",
        "content-type": "application/json",
    })
    headers = ok_headers(r)
    assert set(headers) == set(ident.ALL_HEADERS)
    assert headers[ident.PRINCIPAL] == "bob"
    assert headers[ident.ADMIN] == "false"
    assert json.loads(headers[ident.SCOPES]) == ["chat-*", "embed"]
    assert headers[ident.TOKEN_ID] == resp.info.id
    assert headers[ident.WORKSPACE] == "ws1"
    removed = set(r.ok_response.headers_to_remove)
    assert removed == {"x-fmapi-smuggled", "authorization"}
    got = ident.verify(headers, KEY, time.time(), method="POST",
                       path="/serving-endpoints/chat-a/invocations")
    assert got is not None and got.principal == "bob" and got.may_query("chat-x")
    assert not got.may_query("other")
    assert r.dynamic_metadata["token_id"] == resp.info.id


async def test_scope_403(replicas):
    a, _ = replicas
    secret = (await create(a, endpoints=("chat-*",))).secret
    assert ok_headers(await check(a, "/serving-endpoints/chat-1/invocations", token=secret))
    body, _ = assert_denied(
        await check(a, "/serving-endpoints/embed/invocations", token=secret),
        403, "PERMISSION_DENIED", "embed")
    assert body["error"]["type"] == "permission_error"
    assert_denied(await check(a, "/api/2.0/serving-endpoints/embed", token=secret, method="GET"),
                  403, "PERMISSION_DENIED")
    assert_denied(await check(a, "/api/2.0/token/create", token=secret), 403, "PERMISSION_DENIED",
                  "admin")
    # Body-named endpoints pass here; the gateway checks x-fmapi-scopes against `model`.
    assert ok_headers(await check(a, "/v1/chat/completions", token=secret))
    no_scope = (await create(a, endpoints=())).secret
    assert_denied(await check(a, "/v1/embeddings", token=no_scope), 403, "PERMISSION_DENIED")
    admin = (await create(a, endpoints=(), admin=True)).secret
    assert ok_headers(await check(a, "/api/2.0/token/list", token=admin, method="GET"))


async def test_grpc_request_denial_carries_grpc_status(replicas):
    a, _ = replicas
    r = await check(a, "/fmapi.inference.v1.InferenceService/Chat",
                    headers={"content-type": "application/grpc"})
    assert r.status.code == 16
    h = {o.header.key: o.header.value for o in r.denied_response.headers}
    assert h["grpc-status"] == "16" and "missing API token" in h["grpc-message"]
    assert h["content-type"] == "application/grpc"
    assert "grpc-status-details-bin" in h


async def test_expired_token_401(replicas):
    a, b = replicas
    resp = await create(a, lifetime=1)
    assert ok_headers(await check(b, token=resp.secret))
    await asyncio.sleep(1.1)
    assert_denied(await check(b, token=resp.secret), 401, "UNAUTHENTICATED", "expired")
    assert_denied(await check(a, token=resp.secret), 401, "UNAUTHENTICATED")


async def test_revocation_reaches_every_replica_within_a_second(replicas):
    a, b = replicas
    resp = await create(a)
    # Warm both replicas' caches.
    for _ in range(3):
        assert ok_headers(await check(a, token=resp.secret))
        assert ok_headers(await check(b, token=resp.secret))
    await a.auth.RevokeToken(auth_pb2.RevokeTokenRequest(id=resp.info.id), timeout=5)
    t0 = time.monotonic()
    elapsed = {}
    while len(elapsed) < 2 and time.monotonic() - t0 < 3:
        for name, proc in (("a", a), ("b", b)):
            if name not in elapsed and denied_status(await check(proc, token=resp.secret)) == 401:
                elapsed[name] = time.monotonic() - t0
        await asyncio.sleep(0.01)
    assert set(elapsed) == {"a", "b"}, elapsed
    # The contract is one second (the cache TTL alone guarantees it); pub/sub makes it immediate,
    # which the tighter bound checks.
    assert max(elapsed.values()) < 0.5, elapsed
    body, _ = assert_denied(await check(b, token=resp.secret), 401, "UNAUTHENTICATED")


# ---------------------------------------------------------------- bootstrap


async def test_bootstrap_admin_token_written_once(tmp_path):
    with RedisServer(tmp_path / "redis") as srv:
        token_file = tmp_path / ".fmapi" / "dev-token"
        env = {"FMAPI_AUTH_BOOTSTRAP_ADMIN_TOKEN_FILE": str(token_file)}
        p = AuthProcess(tmp_path, srv.url, "boot", **env).start()
        try:
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            secret = token_file.read_text().strip()
            SECRETS.append(secret)
            assert is_well_formed(secret)
            r = await check(p, "/api/2.0/token/create", token=secret)
            assert ok_headers(r)[ident.ADMIN] == "true"
            assert json.loads(ok_headers(r)[ident.SCOPES]) == ["*"]
        finally:
            await p.stop()

        p = AuthProcess(tmp_path, srv.url, "boot2", **env).start()
        try:
            assert token_file.read_text().strip() == secret
            tokens = (await p.auth.ListTokens(auth_pb2.ListTokensRequest(), timeout=5)).tokens
            assert len(tokens) == 1 and tokens[0].scopes.admin
            assert ok_headers(await check(p, "/api/2.0/token/list", token=secret))
            # Once the admin token is revoked, the next start writes a new one.
            await p.auth.RevokeToken(auth_pb2.RevokeTokenRequest(id=tokens[0].id), timeout=5)
        finally:
            await p.stop()
        assert "not creating" in (tmp_path / "boot2.log").read_text()

        p = AuthProcess(tmp_path, srv.url, "boot3", **env).start()
        try:
            new = token_file.read_text().strip()
            SECRETS.append(new)
            assert new != secret and is_well_formed(new)
            assert ok_headers(await check(p, "/api/2.0/token/list", token=new))
        finally:
            await p.stop()
        assert_no_secret_in_redis(srv)
        for name in ("boot", "boot2", "boot3"):
            assert_no_secret_in(Path(tmp_path / f"{name}.log").read_text(), f"{name}.log")


# ---------------------------------------------------------------- fail closed


async def test_redis_down_fails_closed_with_503(tmp_path):
    srv = RedisServer(tmp_path / "redis").start()
    p = AuthProcess(tmp_path, srv.url, "closed").start()
    try:
        secret = (await create(p)).secret
        for _ in range(3):  # cached now
            assert ok_headers(await check(p, token=secret))
        srv.stop()
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.5:
            r = await check(p, token=secret)
            body, headers = assert_denied(r, 503, "TEMPORARILY_UNAVAILABLE", "unavailable")
            assert headers["retry-after"] == "1"
            n += 1
        assert n > 5
        from fmapi_auth.tokens import generate_secret

        assert_denied(await check(p, token=generate_secret()), 503, "TEMPORARILY_UNAVAILABLE")
        # Requests that need no token still pass; a missing token is still a 401.
        assert ok_headers(await check(p, "/healthz", method="GET")) == {}
        assert_denied(await check(p), 401, "UNAUTHENTICATED")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await p.auth.ListTokens(auth_pb2.ListTokensRequest(), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await p.stop()
        srv.stop()


# ---------------------------------------------------------------- secrets never stored or logged


def assert_no_secret_in(text: str, where: str) -> None:
    assert SECRETS
    for s in SECRETS:
        assert s not in text, f"secret found in {where}"
        assert s[6:26] not in text, f"part of a secret found in {where}"


def assert_no_secret_in_redis(srv: RedisServer) -> None:
    r = redis.Redis.from_url(srv.url, decode_responses=True)
    dump = []
    for key in r.scan_iter("*"):
        dump.append(key)
        kind = r.type(key)
        if kind == "string":
            dump.append(r.get(key) or "")
        elif kind == "hash":
            dump.extend(f"{k}={v}" for k, v in r.hgetall(key).items())
        elif kind == "set":
            dump.extend(r.smembers(key))
        else:
            dump.append(f"<{kind}>")
    r.close()
    assert_no_secret_in("\n".join(dump), "redis")
    return dump


# ---------------------------------------------------------------- attacks (issue: zero trust)


async def test_attack_token_api_without_a_client_certificate_fails(replicas):
    a, _ = replicas
    async with grpc.aio.insecure_channel(a.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await auth_pb2_grpc.AuthServiceStub(ch).CreateToken(auth_pb2.CreateTokenRequest(
                name="pwn", owner=auth_pb2.Principal(id="mallory", workspace="ws1"),
                scopes=auth_pb2.Scopes(endpoints=["*"], admin=True)), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("identity", ["envoy", "routing", "generation", "embedding"])
async def test_attack_only_the_gateway_manages_tokens(replicas, identity):
    a, _ = replicas
    victim = await create(a, admin=True, principal="admin")
    async with tls.aio_channel(a.address, identity, "auth") as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        calls = [
            stub.CreateToken(auth_pb2.CreateTokenRequest(
                name="pwn", owner=auth_pb2.Principal(id="mallory", workspace="ws1"),
                scopes=auth_pb2.Scopes(endpoints=["*"], admin=True)), timeout=5),
            stub.RevokeToken(auth_pb2.RevokeTokenRequest(id=victim.info.id), timeout=5),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert identity in err.value.details()
    # The admin token still works.
    ok_headers(await check(a, token=victim.secret))


@pytest.mark.parametrize("identity", ["gateway", "routing", "generation"])
async def test_attack_only_envoy_may_ask_check(replicas, identity):
    a, _ = replicas
    secret = (await create(a, admin=True)).secret
    async with tls.aio_channel(a.address, identity, "auth") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await external_auth_pb2_grpc.AuthorizationStub(ch).Check(
                check_request("/v1/models", {"authorization": f"Bearer {secret}"}, "GET"),
                timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_signed_identity_is_fresh_per_request(replicas):
    """Each allow is signed for its own request: a signature never serves a second one."""
    a, _ = replicas
    secret = (await create(a, endpoints=("chat-*",))).secret
    path = "/serving-endpoints/chat-a/invocations"
    one = ok_headers(await check(a, path=path, token=secret, headers={"x-request-id": "r1"}))
    two = ok_headers(await check(a, path=path, token=secret, headers={"x-request-id": "r2"}))
    assert one[ident.SIGNATURE] != two[ident.SIGNATURE]
    now = time.time()
    assert ident.verify({**one, "x-request-id": "r1"}, KEY, now, method="POST", path=path)
    assert ident.verify({**one, "x-request-id": "r2"}, KEY, now, method="POST", path=path) is None
    assert ident.verify({**one, "x-request-id": "r1"}, KEY, now, method="POST",
                        path="/v1/embeddings") is None
    assert ident.verify({**one, "x-request-id": "r1"}, KEY, now + 6, method="POST", path=path) is None


# ---------------------------------------------------------------- through a real Envoy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Echo(BaseHTTPRequestHandler):
    def _reply(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        headers: dict[str, list[str]] = {}
        for k, v in self.headers.items():
            headers.setdefault(k.lower(), []).append(v)
        body = json.dumps({"path": self.path, "headers": headers}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _reply

    def log_message(self, *args):
        pass


ENVOY_CONFIG = """
static_resources:
  listeners:
  - name: public
    address: {socket_address: {address: 127.0.0.1, port_value: %(listen)d}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: public
          codec_type: AUTO
          normalize_path: true
          merge_slashes: true
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/fmapi.auth.v1.AuthService/", grpc: {}}
                route: {cluster: auth}
              - match: {prefix: "/"}
                route: {cluster: echo}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              status_on_error: {code: ServiceUnavailable}
              grpc_service:
                envoy_grpc: {cluster_name: auth}
                timeout: 2s
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: auth
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: auth
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %(auth)d}}}}]}]
  - name: echo
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: echo
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %(echo)d}}}}]}]
"""


def _envoy_binary() -> str | None:
    cand = Path(sys.executable).parent / "envoy"
    return str(cand) if cand.exists() else shutil.which("envoy")


@pytest.fixture(scope="module")
def envoy(replicas, tmp_path_factory):
    binary = _envoy_binary()
    if binary is None:
        pytest.skip("envoy binary not installed")
    a, _ = replicas
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    d = tmp_path_factory.mktemp("envoy")
    for attempt in range(3):
        listen = _free_port()
        cfg = d / "envoy.yaml"
        config = yaml.safe_load(ENVOY_CONFIG % {"listen": listen, "auth": a.port,
                                                 "echo": echo.server_address[1]})
        # Envoy reaches auth over mutual TLS, as itself, exactly as `fmapi dev up` configures it.
        config["static_resources"]["clusters"][0]["transport_socket"] = envoy_upstream_tls(
            pki.paths(tls.pki_dir(), "envoy"), "auth", h2=True)
        cfg.write_text(yaml.safe_dump(config))
        log = open(d / "envoy.log", "ab")
        proc = subprocess.Popen(
            [binary, "-c", str(cfg), "--disable-hot-restart", "--log-level", "warn",
             "--concurrency", "1"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        up = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=0.2).close()
                up = True
                break
            except OSError:
                time.sleep(0.05)
        if up:
            break
        proc.kill()
        proc.wait()
    else:
        raise RuntimeError((d / "envoy.log").read_text()[-3000:])
    yield f"127.0.0.1:{listen}"
    proc.terminate()
    proc.wait(10)
    echo.shutdown()


async def test_envoy_http(envoy, replicas):
    import httpx

    a, _ = replicas
    secret = (await create(a, endpoints=("chat-*",), principal="carol")).secret
    async with httpx.AsyncClient(base_url=f"http://{envoy}", timeout=10) as http:
        r = await http.post("/serving-endpoints/chat-1/invocations", json={})
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error_code"] == "UNAUTHENTICATED"
        assert r.json()["error"]["type"] == "authentication_error"

        r = await http.post("/serving-endpoints/other/invocations", json={},
                            headers={"authorization": f"Bearer {secret}"})
        assert r.status_code == 403 and r.json()["error_code"] == "PERMISSION_DENIED"

        r = await http.post(
            "/serving-endpoints/chat-1/invocations", json={},
            headers=[("authorization", f"Bearer {secret}"),
                     ("x-fmapi-principal", "mallory"), ("x-fmapi-principal", "eve"),
                     ("x-fmapi-admin", "true"), ("x-fmapi-identity-sig", "v1=00"),
                     ("x-fmapi-extra", "1")],
        )
        assert r.status_code == 200, r.text
        seen = r.json()["headers"]
        assert seen["x-fmapi-principal"] == ["carol"]
        assert seen["x-fmapi-admin"] == ["false"]
        assert "x-fmapi-extra" not in seen and "authorization" not in seen
        flat = {k: v[0] for k, v in seen.items() if len(v) == 1}
        got = ident.verify(flat, KEY, time.time(), method="POST",
                           path="/serving-endpoints/chat-1/invocations")
        assert got is not None and got.principal == "carol" and got.scopes == ("chat-*",)

        r = await http.get("/healthz", headers={"x-fmapi-principal": "mallory"})
        assert r.status_code == 200
        assert not [k for k in r.json()["headers"] if k.startswith("x-fmapi-")]


async def test_envoy_grpc_denials_are_grpc_statuses(envoy, replicas):
    a, _ = replicas
    user = (await create(a, endpoints=("*",))).secret
    admin = (await create(a, endpoints=(), admin=True)).secret
    async with grpc.aio.insecure_channel(envoy) as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ListTokens(auth_pb2.ListTokensRequest(), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing API token" in exc.value.details()

        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ListTokens(auth_pb2.ListTokensRequest(), timeout=5,
                                  metadata=[("authorization", f"Bearer {user}")])
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not an admin token" in exc.value.details()
        from fmapi_common.errors import PermissionDenied, from_rpc_error

        err = from_rpc_error(exc.value)
        assert isinstance(err, PermissionDenied) and err.reason == "permission_denied"
        # The rich status (google.rpc.Status with ErrorInfo) came through Envoy too.
        details = dict(exc.value.trailing_metadata() or ())
        st = status_pb2.Status.FromString(details["grpc-status-details-bin"])
        assert st.code == 7 and st.details and st.details[0].Is(
            error_details_pb2.ErrorInfo.DESCRIPTOR)

        # Even an admin token does not open the internal token API to whatever Envoy routes
        # there: only the gateway's certificate may call it.
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ListTokens(auth_pb2.ListTokensRequest(), timeout=5,
                                  metadata=[("authorization", f"Bearer {admin}")])
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "envoy may not call" in exc.value.details()


# ---------------------------------------------------------------- the store in-process


async def test_store_cache_single_flight_and_pubsub(redis_srv):
    """Concurrent checks share one lookup; a revocation on another store clears the cache."""
    import redis.asyncio as aioredis

    from fmapi_auth.tokens import TokenStore
    from fmapi_common.errors import Unauthenticated

    def store() -> TokenStore:
        return TokenStore(aioredis.from_url(redis_srv.url, decode_responses=True),
                          pubsub_redis=aioredis.from_url(redis_srv.url, decode_responses=True),
                          namespace="test:store", cache_ttl=1.0)

    s1, s2 = store(), store()
    await s1.start()
    await s2.start()
    try:
        assert await s1.wait_subscribed(5) and await s2.wait_subscribed(5)
        secret, rec = await s1.create(principal="dave", endpoints=("x",))
        SECRETS.append(secret)
        sync = redis.Redis.from_url(redis_srv.url)
        sync.config_resetstat()
        got = await asyncio.gather(*(s2.authenticate(secret) for _ in range(50)))
        assert {r.id for r in got} == {rec.id}
        for _ in range(20):  # cached
            await s2.authenticate(secret)
        calls = sync.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)
        assert calls == 1, calls
        await s1.revoke(rec.id)
        t0 = time.monotonic()
        while True:
            try:
                await s2.authenticate(secret)
            except Unauthenticated:
                break
            await asyncio.sleep(0.001)
        assert time.monotonic() - t0 < 0.2
        sync.close()
    finally:
        await s1.close()
        await s2.close()


# ---------------------------------------------------------------- last: no leaks


async def test_zz_no_secret_in_redis_or_logs(replicas, redis_srv):
    a, b = replicas
    # Runs last: use every token this module created on both replicas, then look everywhere.
    for s in SECRETS:
        await check(a, token=s)
        await check(b, token=s)
    dump = assert_no_secret_in_redis(redis_srv)
    hashes = {hash_secret(s) for s in SECRETS}
    assert any(h in line for h in hashes for line in dump)  # stored as hashes indeed
    assert "created token" in a.log()  # the logs are there and do say things
    for proc in replicas:
        assert_no_secret_in(proc.log(), proc.log_path.name)
