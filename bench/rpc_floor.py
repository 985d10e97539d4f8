"""What one small internal call costs the process that answers it, by protocol: the floor under
every hop of the path (ext_authz ``Check``, ``Embed``, ``AdmitMany``, ...), measured to decide
which hops are worth a cheaper form (issue 15 names Envoy's HTTP ext_authz mode).

Three servers answer the same exchange (a 400-byte request, a 300-byte answer), both over mutual
TLS with fmapi's own certificates:

* ``grpc``: a ``grpc.aio`` server with one unary method, as every fmapi service serves (no
  interceptors: they measured within noise of none);
* ``grpc_sync``: the same method on grpc's synchronous server (a thread pool of CONCURRENT);
* ``http``: an HTTP/1.1 server on uvloop with httptools' parser (what uvicorn uses underneath),
  keep-alive connections, answering ``200`` with headers only, as an HTTP ext_authz service
  would.

Clients: ``grpc.aio`` channels and aiohttp keep-alive connections. Blocks of calls alternate
between the sides (after a warm-up), sequential and then CONCURRENT at a time; per side: the
server's CPU per call (from /proc), the client's, and the round trip p50.
Run: ``python -m bench rpc_floor`` (not part of a plain ``make bench``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import cpu_seconds, median, pct, table

CONCURRENT = 16
BLOCK = 500  # calls per block; the sides alternate block by block
BLOCKS = 6  # per side and concurrency
WARMUP = 300
REQUEST = b"r" * 400
ANSWER = b"a" * 300


def _serve_grpc(port: int, pki_dir: str) -> None:
    import grpc

    from fmapi_common import pki

    p = pki.paths(pki_dir, "auth")

    async def main() -> None:
        async def method(request, context):
            return ANSWER

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Floor", {"Call": grpc.unary_unary_rpc_method_handler(method)}),))
        creds = grpc.ssl_server_credentials([(p.key.read_bytes(), p.cert.read_bytes())],
                                            p.ca.read_bytes(), require_client_auth=True)
        server.add_secure_port(f"127.0.0.1:{port}", creds)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _serve_grpc_sync(port: int, pki_dir: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from fmapi_common import pki

    p = pki.paths(pki_dir, "auth")

    def method(request, context):
        return ANSWER

    server = grpc.server(ThreadPoolExecutor(max_workers=CONCURRENT))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Floor", {"Call": grpc.unary_unary_rpc_method_handler(method)}),))
    creds = grpc.ssl_server_credentials([(p.key.read_bytes(), p.cert.read_bytes())],
                                        p.ca.read_bytes(), require_client_auth=True)
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    server.start()
    server.wait_for_termination()


def _serve_http(port: int, pki_dir: str) -> None:
    import httptools
    import uvloop

    from fmapi_common import pki

    p = pki.paths(pki_dir, "auth")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(p.ca))
    ctx.load_cert_chain(str(p.cert), str(p.key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    answer = (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-answer: " + ANSWER + b"\r\n\r\n")

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(answer)

    async def main() -> None:
        await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port, ssl=ctx)
        await asyncio.Event().wait()

    uvloop.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the bench server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the bench server did not start")


async def _measure(pki_dir: str, pids: dict[str, int], ports: dict[str, int]) -> dict:
    import aiohttp
    import grpc

    from fmapi_common import pki

    c = pki.paths(pki_dir, "envoy")
    creds = grpc.ssl_channel_credentials(c.ca.read_bytes(), c.key.read_bytes(),
                                         c.cert.read_bytes())
    ctx = ssl.create_default_context(cafile=str(c.ca))
    ctx.load_cert_chain(str(c.cert), str(c.key))
    ctx.check_hostname = False  # the server's certificate names "auth", not 127.0.0.1
    me = os.getpid()
    out: dict = {}
    options = [("grpc.ssl_target_name_override", "auth")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{ports['grpc']}", creds,
                                       options=options) as aio_channel, \
            grpc.aio.secure_channel(f"127.0.0.1:{ports['grpc_sync']}", creds,
                                    options=options) as sync_channel, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                limit=CONCURRENT, ssl=ctx)) as session:
        aio_call = aio_channel.unary_unary("/bench.Floor/Call")
        sync_call = sync_channel.unary_unary("/bench.Floor/Call")
        url = f"https://127.0.0.1:{ports['http']}/v1/embeddings"

        async def http_call() -> None:
            async with session.post(url, data=REQUEST) as r:
                await r.read()

        calls = {"grpc": lambda: aio_call(REQUEST), "grpc_sync": lambda: sync_call(REQUEST),
                 "http": http_call}

        async def block(side: str, n: int, clients: int, rtts: list[float]) -> None:
            async def worker(k: int) -> None:
                for _ in range(k):
                    t0 = time.perf_counter()
                    await calls[side]()
                    rtts.append(time.perf_counter() - t0)

            await asyncio.gather(*(worker(n // clients) for _ in range(clients)))

        for clients in (1, CONCURRENT):
            for side in calls:
                await block(side, WARMUP, clients, [])
            got = {side: {"server": 0.0, "client": 0.0, "calls": 0, "rtt": []} for side in calls}
            for i in range(BLOCKS * len(calls)):
                side = list(calls)[i % len(calls)]
                g = got[side]
                s0, c0 = cpu_seconds(pids[side]), cpu_seconds(me)
                await block(side, BLOCK, clients, g["rtt"])
                g["server"] += cpu_seconds(pids[side]) - s0
                g["client"] += cpu_seconds(me) - c0
                g["calls"] += BLOCK
            out[clients] = got
    return out


def run() -> dict[str, float]:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        from fmapi_common import pki

        pki_dir = str(Path(tmp) / "pki")
        pki.ensure_pki(pki_dir)
        ports = {side: _free_port() for side in ("grpc", "grpc_sync", "http")}
        procs = {side: subprocess.Popen([sys.executable, "-c", (
            f"from bench.rpc_floor import _serve_{side}; _serve_{side}({ports[side]}, {pki_dir!r})")],
            cwd=str(Path(__file__).resolve().parents[1])) for side in ports}
        try:
            for side, proc in procs.items():
                _wait_port(ports[side], proc)
            got = asyncio.run(_measure(pki_dir, {s: p.pid for s, p in procs.items()}, ports))
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait()
    for clients, sides in got.items():
        rows = []
        per = {}
        for side, g in sides.items():
            per[side] = 1e6 * g["server"] / g["calls"]
            rows.append((f"{side:9s} server CPU per call",
                         f"{per[side]:7.1f} us   client {1e6 * g['client'] / g['calls']:7.1f} us   "
                         f"round trip p50 {1e3 * median(g['rtt']):.3f} ms, "
                         f"p99 {1e3 * pct(g['rtt'], 99):.3f} ms"))
            results[f"{side}_server_us_c{clients}"] = per[side]
        for side in ("grpc_sync", "http"):
            rows.append((f"server CPU grpc / {side}", f"{per['grpc'] / max(per[side], 1e-9):7.2f}"))
        table(f"one small call over mutual TLS, {clients} at a time, {BLOCKS} blocks of "
              f"{BLOCK} per side (alternating)", rows)
    return results


if __name__ == "__main__":
    run()
