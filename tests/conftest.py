"""Shared fixtures: the whole system started once per session, the way `make run` starts it."""

from __future__ import annotations

import os

import pytest

from fmapi_cli.system import System, SystemOptions
from helpers.otlp import OtlpCollector

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def otlp():
    collector = OtlpCollector().start()
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def system(tmp_path_factory, otlp):
    """Redis, routing, embedding, gateway and Envoy, on free ports, exporting spans to ``otlp``."""
    sys_ = System(
        SystemOptions(
            runtime_dir=tmp_path_factory.mktemp("fmapi"),
            http_port=0,
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            },
        )
    )
    sys_.start()
    yield sys_
    sys_.stop()
