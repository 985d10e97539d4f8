"""One typed config object per service, read from the environment and command-line flags.

Every service subclasses :class:`ServiceConfig` with its own ``env_prefix``; nothing else in
fmapi reads the environment (OpenTelemetry's standard ``OTEL_*`` variables are read by the SDK).
"""

from __future__ import annotations

import sys
from typing import Annotated, TypeVar

from pydantic import AfterValidator, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .identity import parse_key
from .tls import TlsFiles

C = TypeVar("C", bound="ServiceConfig")


class ServiceConfig(BaseSettings):
    """Settings every gRPC service has."""

    model_config = SettingsConfigDict(extra="forbid", cli_kebab_case=True, cli_implicit_flags=True)

    host: str = "127.0.0.1"
    port: int = 0
    # Where to write the bound port once listening (lets a supervisor use port 0).
    port_file: str | None = None
    log_level: str = "INFO"
    # Seconds in-flight calls get to finish on SIGTERM.
    grace_seconds: float = 5.0
    # gRPC max receive message size.
    max_message_bytes: int = 4 * 1024 * 1024
    # Mutual TLS for every internal call (required): the CA that peers' certificates must chain
    # to, and this process's certificate and key (PEM). The certificate's common name is the
    # identity other services authorize (gateway, routing, generation, ...).
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Plaintext and unauthenticated internal calls, instead of mutual TLS: only for measuring
    # what TLS costs (the benchmarks). Never in a deployment.
    insecure: bool = False
    # Serve gRPC reflection (lists every method to anyone who may connect).
    reflection: bool = False
    # Prometheus metrics over HTTP on this port (0 = any free port; unset = no metrics server),
    # and where to write the bound port.
    metrics_port: int | None = None
    metrics_port_file: str | None = None
    # Run on uvloop (installed with uvicorn[standard]) instead of asyncio's own event loop. The
    # gateway does by default (its TLS and HTTP work costs measurably less there); the others
    # measured no difference beyond noise, so asyncio's own loop stays their default.
    uvloop: bool = False

    @model_validator(mode="after")
    def _tls_required(self):
        given = [self.tls_ca_file, self.tls_cert_file, self.tls_key_file]
        if not self.insecure and not all(given):
            raise ValueError(
                "mutual TLS needs tls_ca_file, tls_cert_file and tls_key_file "
                "(or insecure=true, for benchmarks only)"
            )
        return self

    def tls(self) -> TlsFiles | None:
        """This process's TLS files, or None when running insecure."""
        if self.insecure:
            return None
        return TlsFiles(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)  # type: ignore[arg-type]


def _valid_identity_key(v: SecretStr) -> SecretStr:
    parse_key(v.get_secret_value())  # raises ValueError when too short
    return v


# The HMAC key auth signs identities with and the gateway verifies them with: hex (>= 32 hex
# digits) or a raw string of at least 16 bytes. Read it with ``parse_key(v.get_secret_value())``.
IdentityKey = Annotated[SecretStr, AfterValidator(_valid_identity_key)]


def load_config(cls: type[C], argv: list[str] | None = None, prog: str | None = None) -> C:
    """Build ``cls`` from env and flags; exit with a clear message when a value is missing or bad."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return cls(_cli_parse_args=args, _cli_prog_name=prog)  # type: ignore[call-arg]
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        lines = []
        for e in exc.errors():
            field = ".".join(str(p) for p in e["loc"])
            if not field:  # a rule over several settings
                lines.append(e["msg"].removeprefix("Value error, ")
                             + f" (env {prefix.upper()}<SETTING> or --<setting>)")
                continue
            env = (prefix + field).upper().replace("-", "_")
            flag = "--" + field.replace("_", "-")
            if e["type"] == "missing":
                lines.append(f"missing required setting {field}: set {env} or pass {flag}")
            else:
                lines.append(f"bad setting {field} ({env} / {flag}): {e['msg']}")
        raise SystemExit(f"{prog or cls.__name__}: " + "; ".join(lines)) from None
