import asyncio

from fmapi_common.config import load_config
from fmapi_common.logs import setup_logging

from .config import RoutingConfig
from .server import serve


def main() -> None:
    config = load_config(RoutingConfig, prog="fmapi-routing")
    setup_logging(config.log_level, "routing")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
