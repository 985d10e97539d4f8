"""``python -m fmapi_auth``: load the config and serve until SIGTERM."""

from fmapi_common.entry import run_service

from .config import AuthConfig
from .server import serve

if __name__ == "__main__":
    run_service(AuthConfig, serve, "auth")
