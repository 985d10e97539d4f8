"""What external authorization costs: the same small request through Envoy with and without the
ext_authz filter, same system, same run.

With the filter, the client sends its API token and Envoy asks the auth service. Without it (a
second Envoy over the same gateway, filter disabled, same flags, also writing an access log), the
client sends identity headers signed with the system's key, as auth would have, so the gateway
does the same work either way. The two sides alternate in short blocks (order flipped each
round), so load from anything else on the machine falls on both alike.
Goal: <= 1 ms added at p50.
"""

from __future__ import annotations

import http.client
import json
import string
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from .common import pct, table

N = 4000  # requests each way
BLOCK = 100  # requests per block; the sides alternate block by block
WARMUP = 200


class _Client:
    """One keep-alive HTTP/1.1 connection, timing sequential GETs."""

    def __init__(self, url: str, headers_fn) -> None:
        u = urlparse(url)
        self.path = u.path
        self.headers_fn = headers_fn
        self.conn = http.client.HTTPConnection(u.hostname, u.port)

    def run(self, n: int, out: list[float] | None) -> None:
        for _ in range(n):
            headers = self.headers_fn()
            t0 = time.perf_counter()
            self.conn.request("GET", self.path, headers=headers)
            resp = self.conn.getresponse()
            body = resp.read()
            dt = time.perf_counter() - t0
            if resp.status != 200:
                raise RuntimeError(f"{resp.status}: {body[:200]!r}")
            if out is not None:
                out.append(dt * 1000)

    def close(self) -> None:
        self.conn.close()


def _diagnose(system) -> None:
    """On a failure: what Envoy's ext_authz and auth cluster counted, and auth's log tail."""
    try:
        with urllib.request.urlopen(f"{system.envoy_admin}/stats", timeout=5) as r:
            stats = r.read().decode().splitlines()
        print("\n".join(
            line for line in stats
            if ("ext_authz" in line or "cluster.auth." in line) and not line.endswith(": 0")
        ))
    except OSError as exc:
        print(f"(no Envoy stats: {exc})")
    log = system.run_dir / "logs" / "auth.log"
    if log.exists():
        print(f"---- {log} (tail)\n{log.read_text(errors='replace')[-3000:]}")


def run() -> dict[str, float]:
    from fmapi_cli.supervisor import Supervisor
    from fmapi_cli.system import ENVOY_TEMPLATE, System, SystemOptions, _bin
    from fmapi_common import identity

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        endpoints = tmp / "endpoints.yaml"
        endpoints.write_text(
            "endpoints:\n  - name: all-minilm-l6-v2\n    task: llm/v1/embeddings\n"
            "    served_entities: [{model: all-minilm-l6-v2}]\n"
        )
        system = System(SystemOptions(runtime_dir=tmp / "run", http_port=0, endpoints_file=endpoints))
        system.start()
        sup = Supervisor(tmp / "logs")
        clients: list[_Client] = []
        try:
            # A second Envoy, same config and flags, ext_authz disabled.
            cfg = string.Template(ENVOY_TEMPLATE.read_text()).substitute(
                LISTEN_HOST="127.0.0.1", LISTEN_PORT=0,
                GATEWAY_HTTP_PORT=system.ports["gateway-http"], GATEWAY_GRPC_PORT=system.ports["gateway"],
                AUTH_PORT=system.ports["auth"], ACCESS_LOG=str(tmp / "noauth-access.log"),
                EXT_AUTHZ_DISABLED="true",
            )
            (tmp / "noauth.yaml").write_text(cfg)
            admin_file = tmp / "noauth-admin"
            envoy = sup.start("envoy-noauth", [_bin("envoy"), "-c", str(tmp / "noauth.yaml"),
                                               "--admin-address-path", str(admin_file),
                                               "--disable-hot-restart", "--log-level", "warn",
                                               "--concurrency", "2"])
            admin = sup.wait_for_file(envoy, admin_file, 30)
            port = 0
            for _ in range(100):
                with urllib.request.urlopen(f"http://{admin}/listeners?format=json") as r:
                    port = json.load(r)["listener_statuses"][0]["local_address"]["socket_address"].get("port_value", 0)
                if port:
                    break
                time.sleep(0.1)

            token = system.admin_token
            key = identity.parse_key(system.identity_key)
            ident = identity.Identity(principal="admin", workspace="default", token_id="bench",
                                      scopes=("*",), admin=True)
            path = "/v1/models"
            with_c = _Client(f"{system.base_url}{path}",
                             lambda: {"authorization": f"Bearer {token}"})
            without_c = _Client(f"http://127.0.0.1:{port}{path}",
                                lambda: identity.sign_identity(ident, key, time.time()))
            clients = [with_c, without_c]
            with_auth: list[float] = []
            without: list[float] = []
            try:
                with_c.run(WARMUP, None)
                without_c.run(WARMUP, None)
                for i in range(N // BLOCK):
                    sides = [(with_c, with_auth), (without_c, without)]
                    for client, out in sides if i % 2 == 0 else sides[::-1]:
                        client.run(BLOCK, out)
            except Exception:
                _diagnose(system)
                raise
        finally:
            for c in clients:
                c.close()
            sup.stop()
            system.stop()

    p50w, p99w = pct(with_auth, 50), pct(with_auth, 99)
    p50o, p99o = pct(without, 50), pct(without, 99)
    table(
        f"auth: GET /v1/models through Envoy, {N} sequential requests each way "
        f"(alternating blocks of {BLOCK})",
        [
            ("with ext_authz  p50 / p99", f"{p50w:6.2f} / {p99w:6.2f} ms"),
            ("without         p50 / p99", f"{p50o:6.2f} / {p99o:6.2f} ms"),
            ("added at p50", f"{p50w - p50o:6.2f} ms   (goal <= 1 ms)"),
            ("added at p99", f"{p99w - p99o:6.2f} ms"),
            ("ratio p50 with / without", f"{p50w / p50o:6.2f}"),
        ],
    )
    return {"p50_with": p50w, "p50_without": p50o, "p99_with": p99w, "p99_without": p99o}
