"""What external authorization and internal mutual TLS cost, same run, interleaved.

Three ways to send the same small request (GET /v1/models, which crosses Envoy -> auth (Check),
Envoy -> gateway and gateway -> routing):

* ``mtls``: the system as `make run` starts it (mutual TLS on every internal hop, ext_authz);
* ``no-authz``: a second Envoy over the same system with the ext_authz filter disabled (the
  client sends identity headers signed with the system's key, as auth would, so the gateway
  does the same work);
* ``plaintext``: a second system, identical but for plaintext internal calls (``insecure``).

The three alternate in short blocks (the order rotating each round), so load from anything else
on the machine falls on all alike. A fourth comparison isolates one hop: a unary gRPC call
(health Check) to routing over a long-lived channel, mutual TLS vs plaintext.
Goals: ext_authz <= 1 ms added at p50; mTLS <= 0.2 ms added at p50 per hop.
"""

from __future__ import annotations

import asyncio
import http.client
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from .common import pct, signed_identity, table

N = 3000  # requests each way
BLOCK = 100  # requests per block; the sides alternate block by block
WARMUP = 200
HOPS = 3  # internal hops a GET /v1/models crosses
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
        stats = system.envoy_admin("/stats").text.splitlines()
        print("\n".join(
            line for line in stats
            if ("ext_authz" in line or "cluster.auth." in line) and not line.endswith(": 0")
        ))
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        print(f"(no Envoy stats: {exc})")
    log = system.run_dir / "logs" / "auth.log"
    if log.exists():
        print(f"---- {log} (tail)\n{log.read_text(errors='replace')[-3000:]}")


def _interleave(sides: dict[str, tuple[object, list[float]]], n: int, block: int) -> None:
    """Run every side ``n`` times in blocks, rotating which side goes first each round."""
    names = list(sides)
    for i in range(n // block):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            client, out = sides[name]
            client.run(block, out)


async def _hop_latency(system_tls, system_plain, n: int, block: int) -> tuple[list[float], list[float]]:
    """Unary health checks to routing over one long-lived channel each, as the gateway."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fmapi_common.channels import make_channel

    req = health_pb2.HealthCheckRequest(service="")
    out_tls: list[float] = []
    out_plain: list[float] = []
    channels = [
        make_channel(f"127.0.0.1:{system_tls.ports['routing']}", system_tls.tls_files("gateway"), "routing"),
        make_channel(f"127.0.0.1:{system_plain.ports['routing']}", None, "routing"),
    ]
    try:
        stubs = [health_pb2_grpc.HealthStub(ch) for ch in channels]
        for stub in stubs:
            for _ in range(WARMUP):
                await stub.Check(req, timeout=5)
        for i in range(n // block):
            order = [(stubs[0], out_tls), (stubs[1], out_plain)]
            for stub, out in order if i % 2 == 0 else order[::-1]:
                for _ in range(block):
                    t0 = time.perf_counter()
                    await stub.Check(req, timeout=5)
                    out.append((time.perf_counter() - t0) * 1000)
    finally:
        for ch in channels:
            await ch.close()
    return out_tls, out_plain


def run() -> dict[str, float]:
    from fmapi_cli.system import System, SystemOptions

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        endpoints = tmp / "endpoints.yaml"
        endpoints.write_text(
            "endpoints:\n  - name: all-minilm-l6-v2\n    task: llm/v1/embeddings\n"
            "    served_entities: [{model: all-minilm-l6-v2}]\n"
        )
        systems = [
            System(SystemOptions(runtime_dir=tmp / name, http_port=0, endpoints_file=endpoints, tls=tls))
            for name, tls in (("mtls", True), ("plain", False))
        ]
        clients: list[_Client] = []
        try:
            for system in systems:
                system.start()
            secure, plain = systems
            noauth_port = secure.start_envoy("envoy-noauth", ext_authz=False)
            path = "/v1/models"
            signed_headers = signed_identity(secure, "GET", path)

            sides = {
                "mtls": (_Client(f"{secure.base_url}{path}",
                                 lambda: {"authorization": f"Bearer {secure.admin_token}"}), []),
                "no-authz": (_Client(f"http://127.0.0.1:{noauth_port}{path}", signed_headers), []),
                "plaintext": (_Client(f"{plain.base_url}{path}",
                                      lambda: {"authorization": f"Bearer {plain.admin_token}"}), []),
            }
            clients = [c for c, _ in sides.values()]
            try:
                for c in clients:
                    c.run(WARMUP, None)
                _interleave(sides, N, BLOCK)
            except Exception:
                _diagnose(secure)
                raise
            hop_tls, hop_plain = asyncio.run(_hop_latency(secure, plain, N, BLOCK))
        finally:
            for c in clients:
                c.close()
            for system in systems:
                system.stop()

    lat = {name: out for name, (_, out) in sides.items()}
    p50 = {k: pct(v, 50) for k, v in lat.items()}
    p99 = {k: pct(v, 99) for k, v in lat.items()}
    hop50 = pct(hop_tls, 50) - pct(hop_plain, 50)
    table(
        f"auth: GET /v1/models through Envoy, {N} sequential requests per side "
        f"(alternating blocks of {BLOCK})",
        [
            *((f"{k:10s} p50 / p99", f"{p50[k]:6.2f} / {p99[k]:6.2f} ms") for k in lat),
            ("ext_authz added at p50", f"{p50['mtls'] - p50['no-authz']:6.2f} ms   (goal <= 1 ms)"),
            ("ext_authz added at p99", f"{p99['mtls'] - p99['no-authz']:6.2f} ms"),
            ("mTLS added at p50 (3 hops)", f"{p50['mtls'] - p50['plaintext']:6.2f} ms"),
            ("mTLS added per hop at p50", f"{(p50['mtls'] - p50['plaintext']) / HOPS:6.3f} ms"),
            ("ratio p50 mtls / plaintext", f"{p50['mtls'] / p50['plaintext']:6.2f}"),
        ],
    )
    table(
        f"one hop: gRPC health Check to routing on a long-lived channel, {N} calls per side",
        [
            ("mTLS      p50 / p99", f"{pct(hop_tls, 50):6.3f} / {pct(hop_tls, 99):6.3f} ms"),
            ("plaintext p50 / p99", f"{pct(hop_plain, 50):6.3f} / {pct(hop_plain, 99):6.3f} ms"),
            ("mTLS added at p50", f"{hop50:6.3f} ms   (goal <= 0.2 ms)"),
            ("ratio p50", f"{pct(hop_tls, 50) / pct(hop_plain, 50):6.2f}"),
        ],
    )
    return {"p50_" + k: v for k, v in p50.items()} | {"hop_added_p50": hop50}
