"""``python -m fmapi_gateway``: load the config and serve until SIGTERM."""

from fmapi_common.entry import run_service

from .config import GatewayConfig
from .server import serve

if __name__ == "__main__":
    run_service(GatewayConfig, serve, "gateway")
