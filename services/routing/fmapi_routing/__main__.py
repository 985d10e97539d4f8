"""``python -m fmapi_routing``: load the config and serve until SIGTERM."""

from fmapi_common.entry import run_service

from .config import RoutingConfig
from .server import serve

if __name__ == "__main__":
    run_service(RoutingConfig, serve, "routing")
