"""Settings of the auth service (env ``FMAPI_AUTH_*`` or ``--kebab-case`` flags)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fmapi_common.config import IdentityKey, ServiceConfig
from fmapi_common.identity import parse_key


class AuthConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="FMAPI_AUTH_")

    # Where tokens live, e.g. redis://127.0.0.1:6379/0.
    redis_url: str
    # The HMAC key shared with the gateway for the identity headers: hex (>= 32 hex digits) or a
    # raw string of at least 16 bytes.
    identity_key: IdentityKey
    # On start, when no admin token exists, create one and write its secret here (mode 0600).
    bootstrap_admin_token_file: str | None = None
    bootstrap_admin_principal: str = "admin"
    bootstrap_workspace: str = "default"
    # Per-replica token cache lifetime; revocation also clears it at once over Redis pub/sub.
    cache_ttl_seconds: float = Field(default=1.0, ge=0.0, le=1.0)
    # A token's last_used_time is written at most this often (per replica).
    last_used_interval_seconds: float = Field(default=60.0, ge=0.0)
    # Redis socket and connect timeout; a Check waits at most about twice this before failing.
    redis_timeout_seconds: float = Field(default=0.5, gt=0.0)
    # Redis connections per replica; more concurrent Checks wait (up to the timeout) for one.
    redis_max_connections: int = Field(default=64, ge=2)
    # Remove the Authorization header before Envoy forwards the request (backends never see it).
    strip_authorization: bool = True

    def identity_key_bytes(self) -> bytes:
        return parse_key(self.identity_key.get_secret_value())
