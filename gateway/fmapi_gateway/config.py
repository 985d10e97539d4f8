"""Gateway configuration."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fmapi_common.config import IdentityKey, ServiceConfig
from fmapi_common.identity import parse_key

DEFAULT_REQUEST_TIMEOUT_S = 600.0


class GatewayConfig(ServiceConfig):
    """``port``/``port_file`` are the public gRPC API's; ``http_*`` the REST API's."""

    model_config = SettingsConfigDict(env_prefix="FMAPI_GATEWAY_")

    routing_addr: str
    # The auth service (token management API).
    auth_addr: str
    # The quota service: every inference request is admitted and settled there (required: no
    # request runs unmetered).
    quota_addr: str
    # The usage service (usage totals, inference tables); unset: those APIs answer 503.
    usage_addr: str | None = None
    # Benchmarks only: serve without admission or settlement, to measure what metering costs.
    # Never in a deployment (requests would run unmetered and unlimited).
    unmetered: bool = False
    # How long a request's settlement waits for others to share its SettleMany call, when none
    # is in flight (after the response has gone: no caller waits for it). Fewer calls, and none
    # starting just as the next request comes in; usage records and refunds of unused
    # reservations land this much later. 0: each goes at once.
    settle_linger_ms: float = Field(10.0, ge=0, le=1000)
    # HMAC key shared with auth: only identities signed with it are accepted (hex or raw).
    identity_key: IdentityKey
    http_port: int = 0
    http_port_file: str | None = None
    # Largest request body accepted (the managed product's limit is 4 MB); larger gets 413.
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Idle timeout: longest wait for a backend's next message (a unary answer such as Embed, a
    # generation stream's first message, or its next one). Tokens that keep flowing never hit it,
    # nor does a request waiting in a busy engine's queue: model servers send keep-alives at a
    # third of it (GenerateRequest.keepalive_ms), and an Embed answer that takes longer is
    # waited for while the embedding server answers its health check (Backends.embed).
    backend_timeout_s: float = Field(30.0, gt=0)
    # Overall cap on one request, streaming included, for endpoints whose
    # limits.request_timeout_seconds is 0. Either timeout gives 504 and cancels the engine request.
    request_timeout_s: float = Field(DEFAULT_REQUEST_TIMEOUT_S, gt=0)
    # uvloop: measured through Envoy at 64 clients, 10-15% less gateway CPU per embedding
    # request and per streamed token (uvicorn's TLS and socket writes are most of its work).
    uvloop: bool = True
    # The web console's files, served under /console/ (unset: console/ beside the sources).
    console_dir: str | None = None

    def identity_key_bytes(self) -> bytes:
        return parse_key(self.identity_key.get_secret_value())
