"""``python -m fmapi_usage``: load the config and serve until SIGTERM."""

from fmapi_common.entry import run_service

from .config import UsageConfig
from .server import serve

if __name__ == "__main__":
    run_service(UsageConfig, serve, "usage")
