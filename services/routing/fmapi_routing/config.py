"""Routing service configuration."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fmapi_common.config import ServiceConfig


class RoutingConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="FMAPI_ROUTING_")

    # YAML file declaring the endpoints (see infra/endpoints/dev.yaml).
    endpoints_file: str
    # Redis holding the replica registry, shared by every routing replica.
    redis_url: str
    # Redis socket and connect timeout: an unreachable Redis is a prompt 503, not a hang.
    redis_timeout_seconds: float = Field(default=0.5, gt=0.0)
    redis_max_connections: int = Field(default=64, ge=2)
