import asyncio

from fmapi_common.config import load_config
from fmapi_common.logs import setup_logging

from .config import GenerationConfig
from .server import serve


def main() -> None:
    config = load_config(GenerationConfig, prog="fmapi-generation")
    setup_logging(config.log_level, "generation")
    asyncio.run(serve(config))


# vLLM spawns its engine processes, which re-import __main__: start only when run directly.
if __name__ == "__main__":
    main()
