"""The one way a service process starts: load its config, set up logging, serve until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .config import ServiceConfig, load_config
from .logs import setup_logging

C = TypeVar("C", bound=ServiceConfig)


def run_service(
    config_cls: type[C],
    serve: Callable[[C], Awaitable[None]],
    name: str,
) -> None:
    """Exit with a clear message on bad config; else run ``serve(config)`` to completion."""
    config = load_config(config_cls, prog=f"fmapi-{name}")
    setup_logging(config.log_level, name)
    run = _loop_runner(config, name)
    run(serve(config))


def _loop_runner(config: ServiceConfig, name: str) -> Callable[[Awaitable[None]], None]:
    """uvloop when the config asks for it and it is installed; else asyncio's own loop."""
    if config.uvloop:
        try:
            import uvloop
        except ImportError:
            logging.getLogger(f"fmapi_{name}").warning("uvloop is not installed; using asyncio's loop")
        else:
            return uvloop.run
    return asyncio.run
