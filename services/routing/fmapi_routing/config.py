"""Routing service configuration."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fmapi_common.config import ServiceConfig


class RoutingConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="FMAPI_ROUTING_")

    # YAML file declaring endpoints (see infra/endpoints/dev.yaml), applied to the registry at
    # start ("" = none; the registry in Redis is the truth either way).
    endpoints_file: str = ""
    # Redis holding the replica registry, shared by every routing replica.
    redis_url: str
    # Redis socket and connect timeout: an unreachable Redis is a prompt 503, not a hang.
    redis_timeout_seconds: float = Field(default=0.5, gt=0.0)
    redis_max_connections: int = Field(default=64, ge=2)
    # The view of the registry is rebuilt on every change and at least this often (seconds).
    refresh_seconds: float = Field(default=1.0, gt=0.0, le=60.0)
    # Watchers (gateways) get a snapshot at once when endpoints or replicas change, but one whose
    # only news is replicas' reported load at most this often (seconds): a busy fleet's
    # heartbeats would otherwise send every gateway a full snapshot per beat. The load is as old
    # as the replicas' heartbeats (2 s) anyway.
    load_update_seconds: float = Field(default=1.0, ge=0.0, le=60.0)
    # A change of served entities waits this long for its models' replicas, then fails.
    pending_timeout_seconds: float = Field(default=600.0, gt=0.0)
