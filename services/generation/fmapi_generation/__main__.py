"""``python -m fmapi_generation``: load the config and serve until SIGTERM."""

from fmapi_common.entry import run_service

from .config import GenerationConfig
from .server import serve

# vLLM spawns its engine processes, which re-import __main__: start only when run directly.
if __name__ == "__main__":
    run_service(GenerationConfig, serve, "generation")
