"""``python -m fmapi_auth``: load the config and serve until SIGTERM."""

import logging

from fmapi_common.entry import run_service

from .config import AuthConfig
from .server import serve


def _runner(config: AuthConfig):
    """uvloop when the config asks for it and it is installed; else asyncio's own loop."""
    if not config.uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        logging.getLogger("fmapi_auth").info("uvloop is not installed; using asyncio's loop")
        return None
    return uvloop.run


if __name__ == "__main__":
    run_service(AuthConfig, serve, "auth", runner=_runner)
