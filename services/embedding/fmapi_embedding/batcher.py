"""Dynamic batching: concurrent requests merged into batches for one model.

A batch is bounded by a number of items and a token budget. While another batch runs, the next
one waits at most ``max_wait`` for company after its first request arrives; a request that finds
no batch running starts at once (an idle machine has nothing to save by waiting: the wait would
only add to its latency). A request's items always travel together and come back in order to
that request alone; a request bigger than the bounds runs as a batch of its own. If a batch
fails, its requests are retried one by one so that one bad request fails alone. The model runs
in an executor, never on the event loop.

A request may wait in the queue behind a ``gate`` (its admission by the quota service): it joins
no batch before the gate has opened, and fails with the gate's error if the gate fails. While
every lane runs a batch (:attr:`DynamicBatcher.busy`), a request that arrives cannot start
before one ends, so its admission may wait for others to go in one call; ``on_idle_lane`` is
called when a lane ends its batch and no request is ready for it (the admissions that wait
should go now).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import prometheus_client

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


@dataclass
class _Pending(Generic[T, R]):
    items: list[T]
    tokens: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    gate: asyncio.Future | None = None

    def ready(self) -> bool:
        """Waiting, and free to join a batch: no gate, or its gate has opened. A gate that
        failed never opens (its request is failed by the gate's done callback, which may not
        have run yet when the gate reads done)."""
        if self.future.done():
            return False
        gate = self.gate
        return gate is None or (gate.done() and not gate.cancelled() and gate.exception() is None)


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0


BATCH_SIZE = prometheus_client.Histogram(
    "fmapi_embedding_batch_size", "Inputs per batch the model ran", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
QUEUE_WAIT = prometheus_client.Histogram(
    "fmapi_embedding_queue_wait_seconds", "Time a request waited for its batch to start",
    ["model"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        executor: Executor | None,
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        max_wait: float = 0.005,
        lanes: int = 1,
        name: str = "",
    ) -> None:
        if max_batch_size < 1 or max_batch_tokens < 1 or max_wait < 0 or lanes < 1:
            raise ValueError("batch bounds must be positive")
        self._run = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait
        # Batches that may run at once (the executor needs as many threads): the next batch is
        # cut when a lane is free, from what waits then.
        self._lanes = asyncio.Semaphore(lanes)
        self._lane_count = lanes
        self._running: set[asyncio.Task] = set()
        self.on_idle_lane: Callable[[], None] | None = None
        self._queue: collections.deque[_Pending[T, R]] = collections.deque()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.stats = BatchStats()
        self.inflight = 0
        self._batch_size = BATCH_SIZE.labels(name)
        self._queue_wait = QUEUE_WAIT.labels(name)

    @property
    def busy(self) -> bool:
        """Every lane runs a batch: a request that arrives now waits for one to end."""
        return len(self._running) >= self._lane_count

    async def submit(self, items: list[T], tokens: int, gate: asyncio.Future | None = None) -> list[R]:
        """Run ``items`` (costing ``tokens``) in some batch, once ``gate`` (when given) has
        completed; results in the same order. A gate that fails fails this request with its
        error, and nothing runs."""
        if not items:
            return []
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._loop(), name="batcher")
        pending = _Pending(items, tokens, asyncio.get_running_loop().create_future(), gate=gate)
        if gate is not None and not gate.done():
            gate.add_done_callback(lambda g: self._opened(pending, g))
        elif gate is not None:
            self._opened(pending, gate)
        self._queue.append(pending)
        self._wake.set()
        self.inflight += 1
        try:
            return await pending.future
        finally:
            self.inflight -= 1
            # A cancelled caller still queued leaves the queue; one already running is ignored.
            if pending.future.cancelled() or not pending.future.done():
                pending.future.cancel()

    def _opened(self, pending: _Pending, gate: asyncio.Future) -> None:
        if pending.future.done():
            return
        if gate.cancelled():
            pending.future.cancel()
        elif gate.exception() is not None:
            pending.future.set_exception(gate.exception())
        self._wake.set()

    async def close(self) -> None:
        if self._worker:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.cancel()

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def _ready_items(self) -> int:
        return sum(len(p.items) for p in self._queue if p.ready())

    async def _gather(self) -> list[_Pending[T, R]]:
        """Wait for a first request free to run, then, while another batch runs, up to
        ``max_wait`` (from its arrival) for company; cut one batch of requests free to run
        (gated ones wait for the next)."""
        while True:
            self._drop_cancelled()
            first = next((p for p in self._queue if p.ready()), None)
            if first is not None:
                break
            self._wake.clear()
            await self._wake.wait()
        deadline = first.enqueued + self.max_wait
        while self._running and self._ready_items() < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                break
        batch: list[_Pending[T, R]] = []
        waiting: collections.deque[_Pending[T, R]] = collections.deque()
        size = tokens = 0
        while self._queue:
            p = self._queue.popleft()
            if p.future.done():
                continue
            if not p.ready():
                waiting.append(p)  # its gate is still closed: the next batch
                continue
            fits = size + len(p.items) <= self.max_batch_size and tokens + p.tokens <= self.max_batch_tokens
            if batch and not fits:
                self._queue.appendleft(p)
                break
            batch.append(p)
            size += len(p.items)
            tokens += p.tokens
            if not fits:  # an oversized request runs alone
                break
        waiting.extend(self._queue)
        self._queue = waiting
        return batch

    async def _execute(self, items: list[T]) -> Sequence[R]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, items)

    async def _isolate(self, batch: list[_Pending[T, R]]) -> None:
        """A batch failed: run each request alone, so batch-mates of a bad one still succeed."""
        for p in batch:
            if p.future.done():
                continue
            try:
                res = await self._execute(p.items)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                _fail(p, exc)
            else:
                if not p.future.done():
                    p.future.set_result(list(res))

    async def _loop(self) -> None:
        try:
            while True:
                await self._lanes.acquire()
                try:
                    batch = await self._gather()
                except BaseException:
                    self._lanes.release()
                    raise
                if not batch:
                    self._lanes.release()
                    continue
                task = asyncio.create_task(self._run_batch(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            for task in list(self._running):
                task.cancel()

    async def _run_batch(self, batch: list[_Pending[T, R]]) -> None:
        try:
            flat = [item for p in batch for item in p.items]
            now = time.monotonic()
            for p in batch:
                self._queue_wait.observe(now - p.enqueued)
            self._batch_size.observe(len(flat))
            self.stats.batches += 1
            self.stats.items += len(flat)
            self.stats.largest = max(self.stats.largest, len(flat))
            try:
                results = await self._execute(flat)
                if len(results) != len(flat):
                    raise RuntimeError(f"batch returned {len(results)} results for {len(flat)} items")
            except Exception as exc:  # noqa: BLE001 - handed to the callers
                if len(batch) == 1:
                    _fail(batch[0], exc)
                else:
                    await self._isolate(batch)
                return
            start = 0
            for p in batch:
                end = start + len(p.items)
                if not p.future.done():
                    p.future.set_result(list(results[start:end]))
                start = end
        finally:
            # Now, not in the task's done callback (which runs later): ``busy`` must read false
            # to the requests the hook below lets go. The callback still covers a task
            # cancelled before it ever started.
            self._running.discard(asyncio.current_task())
            self._lanes.release()
            self._wake.set()  # a batch waiting for company stops waiting once nothing runs
            if self.on_idle_lane is not None and not any(p.ready() for p in self._queue):
                self.on_idle_lane()


def _fail(p: _Pending, exc: BaseException) -> None:
    if not p.future.done():
        p.future.set_exception(exc)
