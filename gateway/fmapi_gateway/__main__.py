import asyncio

from fmapi_common.config import load_config
from fmapi_common.logs import setup_logging

from .config import GatewayConfig
from .server import serve


def main() -> None:
    config = load_config(GatewayConfig, prog="fmapi-gateway")
    setup_logging(config.log_level, "gateway")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
