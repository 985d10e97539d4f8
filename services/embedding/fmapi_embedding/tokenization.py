"""Tokenization off the event loop, in two lanes per model.

Counting a 4 MB input's tokens takes seconds. On the event loop that stalled every caller; on
the model's thread it would stall every batch. So each model has two tokenizing threads of its
own, each with its own tokenizer copy (a fast tokenizer is not safe to share between threads; it
releases the GIL while it works): requests up to ``large_request`` characters go through the
small lane, bigger ones through the large lane, so huge inputs only ever wait for each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .model import Encoder, Tokenizer

R = TypeVar("R")

# Characters (or token ids) in one request above which it goes through the large lane: about
# 30 ms of tokenizing on one core.
LARGE_REQUEST = 32 * 1024


class _Lane:
    def __init__(self, tokenizer: Tokenizer, name: str) -> None:
        self._tokenizer = tokenizer  # used on this lane's thread only
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[[Tokenizer], R]) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._tokenizer)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class TokenizerLanes:
    def __init__(self, encoder: Encoder, large_request: int = LARGE_REQUEST) -> None:
        self._small = _Lane(encoder.tokenizer(), f"tokenize-{encoder.name}")
        self._large = _Lane(encoder.tokenizer(), f"tokenize-large-{encoder.name}")
        self.large_request = large_request

    async def run(self, size: int, fn: Callable[[Tokenizer], R]) -> R:
        """``fn(tokenizer)`` on the lane for a request of ``size`` characters."""
        lane = self._large if size > self.large_request else self._small
        return await lane.run(fn)

    def close(self) -> None:
        self._small.close()
        self._large.close()
