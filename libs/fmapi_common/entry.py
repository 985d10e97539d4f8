"""The one way a service process starts: load its config, set up logging, serve until SIGTERM."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .config import ServiceConfig, load_config
from .logs import setup_logging

C = TypeVar("C", bound=ServiceConfig)


def run_service(
    config_cls: type[C],
    serve: Callable[[C], Awaitable[None]],
    name: str,
    runner: Callable[[C], Callable[[Awaitable[None]], None] | None] | None = None,
) -> None:
    """Exit with a clear message on bad config; else run ``serve(config)`` to completion.

    ``runner(config)`` may return a replacement for ``asyncio.run`` (e.g. ``uvloop.run``)."""
    config = load_config(config_cls, prog=f"fmapi-{name}")
    setup_logging(config.log_level, name)
    run = (runner(config) if runner else None) or asyncio.run
    run(serve(config))
