"""What external authorization costs: the same small request through Envoy with and without the
ext_authz filter, same system, same run.

With the filter, the client sends its API token and Envoy asks the auth service. Without it (a
second Envoy over the same gateway, filter disabled), the client sends identity headers signed
with the system's key, as auth would have, so the gateway does the same work either way.
Goal: <= 1 ms added at p50.
"""

from __future__ import annotations

import string
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from .common import pct, table

N = 2000
WARMUP = 200


def _latencies(url: str, headers_fn, n: int) -> list[float]:
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    out = []
    for i in range(n + WARMUP):
        headers = headers_fn()
        t0 = time.perf_counter()
        conn.request("GET", u.path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        dt = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {body[:200]!r}")
        if i >= WARMUP:
            out.append(dt * 1000)
    conn.close()
    return out


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
        try:
            # A second Envoy, same config, ext_authz disabled.
            cfg = string.Template(ENVOY_TEMPLATE.read_text()).substitute(
                LISTEN_HOST="127.0.0.1", LISTEN_PORT=0,
                GATEWAY_HTTP_PORT=system.ports["gateway-http"], GATEWAY_GRPC_PORT=system.ports["gateway"],
                AUTH_PORT=system.ports["auth"], ACCESS_LOG="/dev/null", EXT_AUTHZ_DISABLED="true",
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
                import json

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
            with_auth = _latencies(f"{system.base_url}{path}",
                                   lambda: {"authorization": f"Bearer {token}"}, N)
            without = _latencies(f"http://127.0.0.1:{port}{path}",
                                 lambda: identity.sign_identity(ident, key, time.time()), N)
            # Second round, reversed order, to cancel drift on a shared machine.
            without += _latencies(f"http://127.0.0.1:{port}{path}",
                                  lambda: identity.sign_identity(ident, key, time.time()), N)
            with_auth += _latencies(f"{system.base_url}{path}",
                                    lambda: {"authorization": f"Bearer {token}"}, N)
        finally:
            sup.stop()
            system.stop()

    p50w, p99w = pct(with_auth, 50), pct(with_auth, 99)
    p50o, p99o = pct(without, 50), pct(without, 99)
    table(
        f"auth: GET /v1/models through Envoy, {2 * N} sequential requests each way",
        [
            ("with ext_authz  p50 / p99", f"{p50w:6.2f} / {p99w:6.2f} ms"),
            ("without         p50 / p99", f"{p50o:6.2f} / {p99o:6.2f} ms"),
            ("added at p50", f"{p50w - p50o:6.2f} ms   (goal <= 1 ms)"),
            ("added at p99", f"{p99w - p99o:6.2f} ms"),
            ("ratio p50 with / without", f"{p50w / p50o:6.2f}"),
        ],
    )
    return {"p50_with": p50w, "p50_without": p50o, "p99_with": p99w, "p99_without": p99o}
