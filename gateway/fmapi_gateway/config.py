"""Gateway configuration."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fmapi_common.config import IdentityKey, ServiceConfig
from fmapi_common.identity import parse_key


class GatewayConfig(ServiceConfig):
    """``port``/``port_file`` are the public gRPC API's; ``http_*`` the REST API's."""

    model_config = SettingsConfigDict(env_prefix="FMAPI_GATEWAY_")

    routing_addr: str
    # The auth service (token management API).
    auth_addr: str
    # HMAC key shared with auth: only identities signed with it are accepted (hex or raw).
    identity_key: IdentityKey
    http_port: int = 0
    http_port_file: str | None = None
    # Largest request body accepted (the managed product's limit is 4 MB); larger gets 413.
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Seconds a backend call may take before the caller gets a 503/504-style error.
    backend_timeout_s: float = Field(120.0, gt=0)

    def identity_key_bytes(self) -> bytes:
        return parse_key(self.identity_key.get_secret_value())
