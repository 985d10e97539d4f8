"""Routing service configuration."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from fmapi_common.config import ServiceConfig


class RoutingConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="FMAPI_ROUTING_")

    # YAML file declaring the endpoints (see infra/endpoints/dev.yaml).
    endpoints_file: str
    # Redis holding the replica registry, shared by every routing replica.
    redis_url: str
