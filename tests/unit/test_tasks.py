"""Stopping background tasks when a cancellation gets lost (fmapi_common.tasks)."""

from __future__ import annotations

import asyncio
import logging
import time

from fmapi_common import tasks


async def test_a_task_whose_cancellation_was_swallowed_is_cancelled_again_and_ends():
    swallowed = 0

    async def loop_that_swallows_once():
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as a library can: the loop goes on

    t = asyncio.create_task(loop_that_swallows_once())
    await asyncio.sleep(0.01)
    t0 = time.monotonic()
    await tasks.stop(t, timeout=5)
    assert t.cancelled() and swallowed == 1
    assert time.monotonic() - t0 < 1


async def test_a_task_that_never_ends_is_given_up_after_the_timeout_and_named(caplog):
    stubborn = True

    async def loop():
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                if not stubborn:
                    raise

    t = asyncio.create_task(loop(), name="stubborn-loop")
    await asyncio.sleep(0.01)
    try:
        with caplog.at_level(logging.WARNING, logger="fmapi_common.tasks"):
            t0 = time.monotonic()
            await tasks.stop(t, None, timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 2 and not t.done()
        assert "stubborn-loop" in caplog.text
    finally:
        stubborn = False
        await tasks.stop(t)
    assert t.cancelled()


async def test_tasks_that_end_on_the_first_cancel_stop_at_once_and_their_errors_are_kept():
    async def fails_on_cancel():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    a = asyncio.create_task(asyncio.sleep(30))
    b = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0.01)
    t0 = time.monotonic()
    await tasks.stop(a, b)
    assert time.monotonic() - t0 < 0.5
    assert a.cancelled() and isinstance(b.exception(), RuntimeError)
