"""Quota service configuration (env ``FMAPI_QUOTA_*`` or ``--kebab-case`` flags)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fmapi_common.config import ServiceConfig


class QuotaConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="FMAPI_QUOTA_")

    # Redis holding buckets, reservations and usage streams, shared by every quota replica. Run
    # it with an append-only file fsynced on every write (`--appendonly yes --appendfsync
    # always`): the usage records live there until the SQL writer drains them.
    redis_url: str
    # Redis socket and connect timeout; past it a call fails with UNAVAILABLE (fail closed).
    redis_timeout_seconds: float = Field(default=0.5, gt=0.0)
    # Connections to Redis per replica; past them, a call waits for a free one up to
    # redis_pool_wait_seconds (a burst of admissions queues there rather than failing with 503:
    # 200 at once on 2 busy cores outwaited 0.5 s), then fails with UNAVAILABLE.
    redis_max_connections: int = Field(default=64, ge=1)
    redis_pool_wait_seconds: float = Field(default=2.0, gt=0.0)
    # Prefix of every key; keys of one endpoint share the hash tag {<endpoint>}.
    key_prefix: str = Field(default="fmapi:quota", pattern=r"^[A-Za-z0-9:_.-]{1,64}$")
    # A reservation not settled (or renewed) within this time is settled at its reserved size.
    lease_seconds: float = Field(default=600.0, gt=0.0, le=86400.0)
    # How often each replica looks for expired leases (with jitter).
    reap_interval_seconds: float = Field(default=1.0, gt=0.0)
    # Expired reservations settled per endpoint per script call (bounds one script's run time).
    reap_batch: int = Field(default=100, ge=1, le=10000)
    # How long a settled request id is remembered (a late or repeated Settle/Admit is a no-op).
    settled_ttl_seconds: float = Field(default=3600.0, gt=0.0)
    # Usage records one endpoint's stream may hold while the SQL writer cannot write them (the
    # database is down): past this, new requests to it are refused (503, Retry-After) and not
    # recorded, so Redis stays bounded and no record is ever dropped. 0 = no bound.
    usage_backlog_max: int = Field(default=200_000, ge=0)
    # Provisioned throughput: seconds of capacity a burst may spend when the request says 0.
    default_burst_seconds: float = Field(default=10.0, gt=0.0)
    # Time constant of the demand / admitted-tokens moving averages (GetCapacity).
    demand_window_seconds: float = Field(default=60.0, gt=0.0)
