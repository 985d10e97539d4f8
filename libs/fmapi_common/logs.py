"""Logging set-up shared by every process."""

from __future__ import annotations

import logging


def setup_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
