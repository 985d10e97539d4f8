"""The `fmapi` command: one entry point, a module per command group."""

from __future__ import annotations

import argparse
import sys

from . import dev, endpoints, tokens, usage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmapi", description="fmapi command line")
    sub = parser.add_subparsers(dest="command", required=True)
    dev.add_parser(sub)
    tokens.add_parser(sub)
    endpoints.add_parser(sub)
    usage.add_parser(sub)
    try:
        from . import models
    except ImportError:  # the generation extra is not installed
        models = None
    if models is not None:
        models.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
