"""``python -m fmapi_auth``: load the config and serve until SIGTERM."""

import asyncio

from fmapi_common.config import load_config

from .config import AuthConfig
from .server import serve


def main() -> None:
    asyncio.run(serve(load_config(AuthConfig, prog="fmapi-auth")))


if __name__ == "__main__":
    main()
