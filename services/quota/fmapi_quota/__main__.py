"""``python -m fmapi_quota``: load the config and serve until SIGTERM."""

from fmapi_common.entry import run_service

from .config import QuotaConfig
from .server import serve

if __name__ == "__main__":
    run_service(QuotaConfig, serve, "quota")
