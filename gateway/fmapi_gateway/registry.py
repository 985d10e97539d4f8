"""The gateway's own copy of the registry (endpoints, their settings, live replicas), streamed by
routing's ``WatchRegistry``: requests resolve against it with no routing call.

Staleness: a change reaches this copy as soon as routing has rebuilt its view (on the change's
pub/sub message, tens of milliseconds; at worst routing's refresh period, 1 s). Replica load is
as fresh as the replicas' heartbeats (2 s). While routing is unreachable the last copy keeps
serving and the stream is re-opened with backoff; a fresh snapshot replaces the copy whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from fmapi.routing.v1 import routing_pb2, routing_pb2_grpc
from fmapi_common import tasks
from fmapi_common.router import Router, View

log = logging.getLogger(__name__)

# Longest wait for the next snapshot before the stream is taken for dead and re-opened.
SILENCE_S = 15.0


class LocalRegistry:
    def __init__(self, stub: routing_pb2_grpc.RoutingServiceStub) -> None:
        self._stub = stub
        self.view = View()
        self.router = Router(lambda: self.view)
        self.received_at = 0.0  # monotonic time of the last snapshot
        self._loaded = asyncio.Event()
        self._arrived = asyncio.Event()  # replaced with every snapshot
        self._task: asyncio.Task | None = None

    async def start(self, wait_s: float = 10.0) -> None:
        """Open the stream; wait up to ``wait_s`` for the first snapshot (requests before it get
        503 "registry not loaded")."""
        self._task = asyncio.create_task(self._watch())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._loaded.wait()
        if not self._loaded.is_set():
            log.warning("no registry snapshot from routing yet; still trying")

    async def close(self) -> None:
        await tasks.stop(self._task)

    async def wait_for_version(self, version: int, timeout: float) -> bool:
        """Wait until the copy holds registry ``version`` (or later); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.view.version < version:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._arrived.wait()
        return True

    def status(self) -> str:
        if not self.view.loaded:
            return "NOT_LOADED"
        return f"version {self.view.version}, {time.monotonic() - self.received_at:.1f} s old"

    async def _watch(self) -> None:
        delay = 0.05
        while True:
            call = self._stub.WatchRegistry(routing_pb2.WatchRegistryRequest(),
                                            wait_for_ready=True)
            try:
                while True:
                    # Routing sends a snapshot at least every 5 s: silence means a dead peer
                    # (a connection that broke without a word), not a quiet registry.
                    async with asyncio.timeout(SILENCE_S):
                        msg = await call.read()
                    if msg is grpc.aio.EOF:
                        log.info("registry stream ended (routing shutting down); re-opening")
                        break
                    self.view = View.of(msg)
                    self.received_at = time.monotonic()
                    self._loaded.set()
                    arrived, self._arrived = self._arrived, asyncio.Event()
                    arrived.set()
                    delay = 0.05
            except TimeoutError:
                log.warning("no registry snapshot for %g s; keeping version %d, re-opening",
                            SILENCE_S, self.view.version)
            except grpc.RpcError as exc:
                log.warning("registry stream failed (%s); keeping version %d, re-opening",
                            exc.code().name, self.view.version)
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
