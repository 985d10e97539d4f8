"""Usage service configuration."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fmapi_common.config import ServiceConfig


class UsageConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="FMAPI_USAGE_")

    # The SQL store (FMAPI_USAGE_DATABASE_URL): postgresql+psycopg://... in production,
    # sqlite:///path/usage.db for `make run`.
    database_url: str
    # Redis holding the usage streams the quota service writes.
    redis_url: str
    redis_timeout_seconds: float = Field(default=2.0, gt=0.0)
    # The quota service's key prefix (its usage streams are <prefix>:{<endpoint>}:usage).
    key_prefix: str = "fmapi:quota"
    # Writers in this consumer group share the streams; each record goes to one of them.
    consumer_group: str = "fmapi-usage-writer"
    # This writer's name in the group (FMAPI_USAGE_CONSUMER); default "<hostname>-<pid>". A name
    # that stays the same across restarts (the replica's) lets a restarted writer finish the
    # records it had read before it died at once, instead of after claim_idle_seconds.
    consumer: str = Field(default="", max_length=200)
    # Records written per database transaction, and the longest wait for new ones.
    batch_size: int = Field(default=500, ge=1, le=10_000)
    block_ms: int = Field(default=500, ge=1, le=60_000)
    # After a batch smaller than batch_size, wait this long before reading again, so that a
    # steady load is written in batches rather than a transaction per record or two (each
    # record is already durable in Redis: this only delays its row).
    linger_ms: int = Field(default=200, ge=0, le=10_000)
    # Records another writer read and never acknowledged (it died) are taken over after this.
    claim_idle_seconds: float = Field(default=30.0, gt=0.0)
    # Records waiting in Redis above this: the writer reports NOT_SERVING and logs an alarm.
    backlog_alarm: int = Field(default=100_000, ge=1)
    # How often the served_entities table is brought up to date with the registry.
    entities_interval_seconds: float = Field(default=5.0, gt=0.0)
