"""A minimal HTTP/1.1 client for streamed (server-sent events) responses, for benchmarks.

Each SSE event is stamped with the time the read that completed it returned (``time.perf_counter``
taken first thing in ``data_received``), so a gap between two events is the gap between the
reads that brought them: events are never re-batched by a reader library's buffering (httpx'
``aiter_lines`` goes through h11 and anyio buffers, and its per-line cost on 2 cores steals
time from the servers under test). The client does as little as it can while a response streams:
it frames the chunked body and splits events on the blank line; the events' JSON is decoded
after the response ends.

Events that arrive in one read share a timestamp; ``Response.reads`` counts the reads, so a
caller can tell how often that happened (a server that wrote them together, or a client that
was late to read).

One ``Connection`` is one keep-alive connection, used by one request at a time.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field


class HTTPError(RuntimeError):
    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:500].decode(errors='replace')}")
        self.status = status
        self.body = body


@dataclass
class Response:
    status: int = 0
    sent: float = 0.0  # perf_counter when the request was written
    # (read time, event data) for each SSE event, in order ("data: " stripped).
    events: list[tuple[float, bytes]] = field(default_factory=list)
    reads: int = 0  # body reads that delivered at least one byte
    body: bytes = b""  # non-SSE body (errors)

    def json_events(self) -> list[tuple[float, dict]]:
        out = []
        for t, data in self.events:
            if data == b"[DONE]":
                continue
            out.append((t, json.loads(data)))
        return out


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.done: asyncio.Future | None = None
        self.closed = False
        self._buf = b""  # unparsed bytes (headers, chunk framing)
        self._sse = b""  # body bytes not yet split into events
        self._state = "idle"  # idle | headers | chunk_size | chunk_data | chunk_crlf | trailer | length | close
        self._remaining = 0
        self._keep_alive = True
        self._chunked = False

    # -- asyncio callbacks

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            if self._state == "close":
                self._finish()
            else:
                self.done.set_exception(ConnectionError(f"connection lost mid-response ({exc})"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.resp is None:
            return  # nothing asked (a server's stray bytes)
        self._buf += data
        if self._state != "headers":
            self.resp.reads += 1
        self._parse(now)

    # -- parsing

    def start(self, resp: Response, done: asyncio.Future) -> None:
        self.resp, self.done = resp, done
        self._buf = b""
        self._sse = b""
        self._state = "headers"

    def _parse(self, now: float) -> None:
        while True:
            st = self._state
            if st == "headers":
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self._buf[:end].decode("latin-1").split("\r\n")
                self._buf = self._buf[end + 4:]
                self.resp.status = int(head[0].split(" ", 2)[1])
                hdrs = {}
                for line in head[1:]:
                    k, _, v = line.partition(":")
                    hdrs[k.strip().lower()] = v.strip().lower()
                self._keep_alive = hdrs.get("connection") != "close"
                if "chunked" in hdrs.get("transfer-encoding", ""):
                    self._state = "chunk_size"
                elif "content-length" in hdrs:
                    self._remaining = int(hdrs["content-length"])
                    self._state = "length"
                else:
                    self._keep_alive = False
                    self._state = "close"
                if self._buf:
                    self.resp.reads += 1
            elif st == "chunk_size":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(self._buf[:end].split(b";", 1)[0], 16)
                self._buf = self._buf[end + 2:]
                if size == 0:
                    self._state = "trailer"
                else:
                    self._remaining = size
                    self._state = "chunk_data"
            elif st == "chunk_data":
                if not self._buf:
                    return
                take = self._buf[:self._remaining]
                self._buf = self._buf[len(take):]
                self._remaining -= len(take)
                self._body(take, now)
                if self._remaining == 0:
                    self._state = "chunk_crlf"
            elif st == "chunk_crlf":
                if len(self._buf) < 2:
                    return
                self._buf = self._buf[2:]
                self._state = "chunk_size"
            elif st == "trailer":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    return
                line = self._buf[:end]
                self._buf = self._buf[end + 2:]
                if not line:
                    self._finish()
                    return
            elif st == "length":
                take = self._buf[:self._remaining]
                self._buf = self._buf[len(take):]
                self._remaining -= len(take)
                if take:
                    self._body(take, now)
                if self._remaining == 0:
                    self._finish()
                return
            elif st == "close":
                if self._buf:
                    self._body(self._buf, now)
                    self._buf = b""
                return
            else:
                return

    def _body(self, data: bytes, now: float) -> None:
        if self.resp.status != 200:
            self.resp.body += data
            return
        self._sse += data
        if b"\n\n" not in self._sse and b"\r\n\r\n" not in self._sse:
            return
        text = self._sse.replace(b"\r\n", b"\n")
        *events, self._sse = text.split(b"\n\n")
        for ev in events:
            for line in ev.split(b"\n"):
                if line.startswith(b"data:"):
                    self.resp.events.append((now, line[5:].lstrip(b" ")))

    def _finish(self) -> None:
        self._state = "idle"
        if self._sse.strip() and self.resp.status == 200:
            self._body(b"\n\n", time.perf_counter())
        done, self.done = self.done, None
        resp = self.resp
        self.resp = None
        if not self._keep_alive and self.transport is not None:
            self.transport.close()
        if done is not None and not done.done():
            done.set_result(resp)


class Connection:
    """One keep-alive HTTP/1.1 connection to ``host:port`` (reconnects when the server closed)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._proto: _Protocol | None = None

    async def _ensure(self) -> _Protocol:
        if self._proto is None or self._proto.closed or not self._proto._keep_alive:
            if self._proto is not None and self._proto.transport is not None:
                self._proto.transport.close()
            loop = asyncio.get_running_loop()
            _, self._proto = await loop.create_connection(_Protocol, self.host, self.port)
            sock = self._proto.transport.get_extra_info("socket")
            if sock is not None:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._proto

    async def post(self, path: str, body: dict, headers: dict[str, str] | None = None) -> Response:
        """POST ``body`` as JSON; the whole response (events stamped as they arrived)."""
        payload = json.dumps(body).encode()
        head = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                "Content-Type: application/json", "Accept: text/event-stream",
                f"Content-Length: {len(payload)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
        for attempt in (0, 1):
            proto = await self._ensure()
            resp = Response()
            done = asyncio.get_running_loop().create_future()
            proto.start(resp, done)
            resp.sent = time.perf_counter()
            proto.transport.write(data)
            try:
                resp = await done
            except ConnectionError:
                # A kept-alive connection the server had closed: retry once on a new one, but
                # only if nothing of the response came back.
                if attempt == 0 and resp.status == 0:
                    self._proto = None
                    continue
                raise
            if resp.status != 200:
                raise HTTPError(resp.status, resp.body)
            return resp
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
