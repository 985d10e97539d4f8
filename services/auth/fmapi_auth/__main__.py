"""``python -m fmapi_auth``: load the config and serve until SIGTERM."""

import asyncio
import logging

from fmapi_common.config import load_config

from .config import AuthConfig
from .server import serve


def main() -> None:
    config = load_config(AuthConfig, prog="fmapi-auth")
    run = asyncio.run
    if config.uvloop:
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            logging.getLogger("fmapi_auth").info("uvloop is not installed; using asyncio's loop")
    run(serve(config))


if __name__ == "__main__":
    main()
