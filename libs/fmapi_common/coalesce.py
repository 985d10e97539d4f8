"""Calls that carry many items: what queues up while a call is in flight goes in the next one.

The gateway admits and settles every request with the quota service. One call per request
costs a gRPC call on both sides (and a Redis round trip) each time; a :class:`Coalescer` lets
items wait only while an earlier call of the same kind is in flight, and then sends them
together. At low load every call carries one item and nothing waits; at high load one call
carries many. A call's client span is in the trace of the first request it carries.

Items off the request path (settlements: the caller already has its answer) may also *linger*:
an item that finds no call in flight waits ``linger`` seconds for company before its call goes.
Fewer calls carry more items, and the call no longer starts at the moment the next request
comes in (measured on 2 cores with sequential clients: a settlement sent as its response went
out slowed the next request's authorization and admission, which ran beside it). An item may
bring its own linger (an admission whose request cannot run yet: the model server's lanes are
all busy), and :meth:`Coalescer.flush` ends a wait early (a lane is free and nothing is ready
for it).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """``call(items)`` answers each item, in order. One call runs at a time; it carries at most
    ``max_count`` items and ``max_bytes`` (by ``size``), except that an item bigger than that
    goes alone.

    A caller that is cancelled while its item still waits takes the item back (it is never
    sent) when ``withdraw`` is set; otherwise the item is sent anyway. A call that raises
    raises in each of its callers. ``linger``: seconds an item that finds nothing in flight
    waits for company (0: its call goes at once; :meth:`submit` may say otherwise per item);
    items that queued behind a call go as soon as it answers."""

    def __init__(self, call: Callable[[list[T]], Awaitable[Sequence[R]]], *, max_count: int,
                 max_bytes: int, size: Callable[[T], int], withdraw: bool = False,
                 linger: float = 0.0) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError("a coalescer's bounds must be positive")
        self._linger = _checked(linger)
        self._call = call
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._size = size
        self._withdraw = withdraw
        # (item, its answer, its caller's context: a call runs in its first item's, so that
        # its client span belongs to that request's trace)
        self._queue: list[tuple[T, asyncio.Future, contextvars.Context]] = []
        self._running = False
        self._calls: set[asyncio.Task] = set()
        self._lingering: asyncio.Event | None = None  # set: the wait for company ends now
        self._linger_until = 0.0  # when it ends at the latest (the loop's clock)

    async def submit(self, item: T, *, linger: float | None = None) -> R:
        """``item``'s answer. ``linger``: this item's wait for company when it finds nothing
        in flight (the coalescer's when None)."""
        linger = self._linger if linger is None else _checked(linger)
        loop = asyncio.get_running_loop()
        entry = (item, loop.create_future(), contextvars.copy_context())
        self._queue.append(entry)
        if self._lingering is not None and loop.time() + linger < self._linger_until:
            self._lingering.set()  # this item may not wait as long as those before it
        self._start_calls(linger)
        try:
            return await asyncio.shield(entry[1])
        except asyncio.CancelledError:
            if self._withdraw and entry in self._queue:
                self._queue.remove(entry)
            raise

    def _start_calls(self, linger: float = 0.0) -> None:
        if self._queue and not self._running:
            self._running = True
            context = self._queue[0][2]
            loop = asyncio.get_running_loop()
            # Lingering, the batch is cut when the wait ends; else now. The wait is set up
            # here, not when the task starts, so that a flush or a hurried item in between
            # is not lost.
            batch = None if linger else self._next_batch()
            if linger:
                self._lingering = asyncio.Event()
                self._linger_until = loop.time() + linger
            task = loop.create_task(self._run(batch, linger, self._lingering), context=context)
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    def flush(self) -> None:
        """End a wait for company now: what waits goes in one call at once."""
        if self._lingering is not None:
            self._lingering.set()

    def _next_batch(self) -> list[tuple[T, asyncio.Future, contextvars.Context]]:
        size = 0
        n = min(len(self._queue), self._max_count)
        for i, (item, _, _) in enumerate(self._queue[:n]):
            size += self._size(item)
            if i and size > self._max_bytes:
                n = i
                break
        batch, self._queue = self._queue[:n], self._queue[n:]
        return batch

    async def _run(self, batch: list[tuple[T, asyncio.Future, contextvars.Context]] | None,
                   linger: float, lingering: asyncio.Event | None) -> None:
        try:
            if batch is None:
                batch = []
                try:
                    async with asyncio.timeout(linger):
                        await lingering.wait()
                except TimeoutError:
                    pass
                finally:
                    self._lingering = None
                batch = self._next_batch()
                if not batch:  # every item that waited was withdrawn meanwhile
                    return
            results = await self._call([item for item, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a call answered {len(results)} of {len(batch)} items")
            for (_, done, _), result in zip(batch, results):
                if not done.done():
                    done.set_result(result)
        except Exception as exc:  # noqa: BLE001 - each caller gets it
            for _, done, _ in batch:
                if not done.done():
                    done.set_exception(exc)
        finally:
            for _, done, _ in batch:  # cancelled mid-call: its callers must not wait forever
                if not done.done():
                    done.cancel()
            self._running = False
            self._start_calls()


def _checked(linger: float) -> float:
    if not 0 <= linger <= 10:
        raise ValueError("a coalescer's linger must be between 0 and 10 seconds")
    return linger
