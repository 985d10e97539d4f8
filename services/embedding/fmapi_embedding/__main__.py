"""``python -m fmapi_embedding``: load the config and serve until SIGTERM."""

from fmapi_common.entry import run_service

from .config import EmbeddingConfig
from .server import serve

if __name__ == "__main__":
    run_service(EmbeddingConfig, serve, "embedding")
