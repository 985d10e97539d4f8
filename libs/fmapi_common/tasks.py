"""Stopping background tasks for sure.

``task.cancel()`` can be lost: Python 3.11's ``asyncio.wait_for`` swallows a cancellation that
arrives as the awaited thing completes, and so does the Redis client at some points of a command
(measured with redis-py 8.1: a cancelled ``GET`` finished normally in about a third of the loop
turns tried). A background loop whose cancellation was swallowed goes on, and whoever awaits it
waits forever: a routing replica sent SIGTERM just after it started never exited (1 run in 15
on a loaded machine). :func:`stop` cancels again until the tasks end.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def stop(*tasks: asyncio.Task | None, timeout: float = 5.0, every: float = 0.05) -> None:
    """Cancel ``tasks`` (None ones skipped) and wait until they end, cancelling again every
    ``every`` seconds; after ``timeout`` seconds, log those still running and return."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {t for t in tasks if t is not None and not t.done()}
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            log.warning("tasks still running %.0f s after being cancelled: %s", timeout,
                        ", ".join(sorted(t.get_name() for t in pending)))
            return
        for t in pending:
            t.cancel()
        done, pending = await asyncio.wait(pending, timeout=min(every, left))
        for t in done:  # their errors were theirs to log; don't leave them unretrieved
            if not t.cancelled():
                t.exception()
