"""The identity the auth service vouches for, carried to backends in signed headers.

Envoy's ext_authz filter asks the auth service about every request. When auth allows it, it sets
the identity headers below (overwriting anything a client sent under ``x-fmapi-``) and signs
them: the gateway trusts an identity only when :func:`verify` accepts it, so a caller who reaches
the gateway without going through Envoy cannot claim an identity.

Signature scheme (version 2)::

    ts  = decimal unix time with millisecond precision, e.g. "1732500000.123"
    msg = "fmapi-identity-v2\\n" + for each name in SIGNED_HEADERS (in that order):
              name + "\\n" + str(len(value_utf8)) + ":" + value + "\\n"
          + for each of method, path (without the query), x-request-id:
              str(len(value_utf8)) + ":" + value + "\\n"
          + "ts:" + ts
    sig = "v2=" + hex(HMAC-SHA256(key, msg))

The signature is bound to the one request it was made for: its method, its path and its request
id. Captured headers replayed on another path or method, or after ``max_age`` (a few seconds, so
after a revocation too), are refused. Every signed header must be present exactly once; the
timestamp must be within ``max_age`` seconds of the verifier's clock (either direction). Keys are shared between auth and the gateway
(:func:`parse_key` turns the configured string into bytes the same way on both sides).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

HEADER_PREFIX = "x-fmapi-"

PRINCIPAL = "x-fmapi-principal"
PRINCIPAL_KIND = "x-fmapi-principal-kind"
WORKSPACE = "x-fmapi-workspace"
TOKEN_ID = "x-fmapi-token-id"
SCOPES = "x-fmapi-scopes"
ADMIN = "x-fmapi-admin"
TIMESTAMP = "x-fmapi-identity-ts"
SIGNATURE = "x-fmapi-identity-sig"

#: The identity headers covered by the signature, in canonical order.
SIGNED_HEADERS: tuple[str, ...] = (PRINCIPAL, PRINCIPAL_KIND, WORKSPACE, TOKEN_ID, SCOPES, ADMIN)
#: Every header :func:`sign` returns.
ALL_HEADERS: tuple[str, ...] = (*SIGNED_HEADERS, TIMESTAMP, SIGNATURE)
#: The request id Envoy sets (or keeps) on every request; part of what is signed.
REQUEST_ID = "x-request-id"
#: How old a signature may be when the gateway verifies it (seconds, either direction).
MAX_AGE_SECONDS = 5.0

PRINCIPAL_KINDS = ("user", "service_principal")

_VERSION = "v2"
_CONTEXT = b"fmapi-identity-v2\n"
MIN_KEY_BYTES = 16


@dataclass(frozen=True)
class Identity:
    """Who is calling: a principal in a workspace, through one token, with its scopes."""

    principal: str
    workspace: str
    token_id: str
    #: Endpoint names or glob patterns (``fnmatch``) the token may query.
    scopes: tuple[str, ...] = ()
    #: May manage tokens and endpoints. Independent of ``scopes``: an admin token queries only
    #: the endpoints its scopes match (the bootstrap admin token has ``["*"]``).
    admin: bool = False
    principal_kind: str = "user"

    def may_query(self, endpoint: str) -> bool:
        """Whether this identity's scopes let it query ``endpoint`` (case-sensitive glob match)."""
        return may_query(self.scopes, endpoint)

    def to_headers(self) -> dict[str, str]:
        """The unsigned identity headers (pass them to :func:`sign`)."""
        return {
            PRINCIPAL: self.principal,
            PRINCIPAL_KIND: self.principal_kind,
            WORKSPACE: self.workspace,
            TOKEN_ID: self.token_id,
            SCOPES: encode_scopes(self.scopes),
            ADMIN: "true" if self.admin else "false",
        }


def may_query(scopes: Iterable[str], endpoint: str) -> bool:
    if not endpoint:
        return False
    return any(fnmatchcase(endpoint, pattern) for pattern in scopes)


def encode_scopes(scopes: Iterable[str]) -> str:
    """Compact JSON list, e.g. ``["chat-*","embed"]``."""
    return json.dumps(list(scopes), separators=(",", ":"), ensure_ascii=True)


def decode_scopes(value: str) -> tuple[str, ...] | None:
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    if not isinstance(parsed, list) or not all(isinstance(s, str) for s in parsed):
        return None
    return tuple(parsed)


_HEX = re.compile(r"^(?:[0-9a-fA-F]{2})+$")


def parse_key(value: str | bytes) -> bytes:
    """The HMAC key from its configured form: hex when it is all hex digits, else the raw bytes.

    Raises ``ValueError`` when the key is shorter than 16 bytes.
    """
    if isinstance(value, bytes):
        key = value
    else:
        v = value.strip()
        key = bytes.fromhex(v) if len(v) >= 2 * MIN_KEY_BYTES and _HEX.match(v) else v.encode()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"identity key must be at least {MIN_KEY_BYTES} bytes")
    return key


def _format_ts(now: float) -> str:
    return f"{now:.3f}"


@dataclass(frozen=True)
class Binding:
    """The request a signature is made for: method, path (no query string) and request id."""

    method: str
    path: str
    request_id: str = ""

    @classmethod
    def of(cls, method: str, path: str, request_id: str = "") -> Binding:
        return cls(method.upper(), path.split("?", 1)[0], request_id)


def _canonical(values: Mapping[str, str], binding: Binding, ts: str) -> bytes:
    parts = [_CONTEXT]
    for name in SIGNED_HEADERS:
        raw = values[name].encode("utf-8")
        parts.append(name.encode() + b"\n" + str(len(raw)).encode() + b":" + raw + b"\n")
    for value in (binding.method, binding.path, binding.request_id):
        raw = value.encode("utf-8", "surrogateescape")
        parts.append(str(len(raw)).encode() + b":" + raw + b"\n")
    parts.append(b"ts:" + ts.encode())
    return b"".join(parts)


def _mac(key: bytes, values: Mapping[str, str], binding: Binding, ts: str) -> str:
    digest = hmac.new(key, _canonical(values, binding, ts), hashlib.sha256).hexdigest()
    return _VERSION + "=" + digest


def sign(identity: Mapping[str, str], key: bytes, now: float, binding: Binding) -> dict[str, str]:
    """Headers to add to one request: the identity headers, a timestamp and their signature,
    bound to ``binding`` (that request's method, path and request id).

    ``identity`` maps each name in :data:`SIGNED_HEADERS` to its value (see
    :meth:`Identity.to_headers`); any other key is an error, so nothing unsigned slips through.
    """
    values = {k.lower(): v for k, v in identity.items()}
    unknown = set(values) - set(SIGNED_HEADERS)
    missing = set(SIGNED_HEADERS) - set(values)
    if unknown or missing:
        raise ValueError(
            f"identity headers must be exactly {SIGNED_HEADERS}: "
            f"unknown {sorted(unknown)}, missing {sorted(missing)}"
        )
    for name, value in values.items():
        if not isinstance(value, str) or "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"bad value for {name}")
    ts = _format_ts(now)
    out = {name: values[name] for name in SIGNED_HEADERS}
    out[TIMESTAMP] = ts
    out[SIGNATURE] = _mac(key, values, Binding.of(binding.method, binding.path, binding.request_id), ts)
    return out


def sign_identity(identity: Identity, key: bytes, now: float, binding: Binding) -> dict[str, str]:
    return sign(identity.to_headers(), key, now, binding)


_COLLECTED = frozenset((*ALL_HEADERS, REQUEST_ID))


def _collect(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str] | None:
    """Lower-cased header values we care about; None when one of them appears twice."""
    items = headers.items() if hasattr(headers, "items") else headers
    seen: dict[str, str] = {}
    for k, v in items:
        name = k.decode("latin-1") if isinstance(k, bytes) else str(k)
        name = name.lower()
        if name not in _COLLECTED:
            continue
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        if name in seen:
            return None  # a duplicated identity header is ambiguous: refuse it
        seen[name] = v
    return seen


def verify(
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    key: bytes | Sequence[bytes],
    now: float,
    *,
    method: str,
    path: str,
    max_age: float = MAX_AGE_SECONDS,
) -> Identity | None:
    """The identity the headers carry when auth signed them recently with ``key`` for this
    request (``method`` and ``path`` as received, and the ``x-request-id`` among ``headers``);
    else None.

    ``headers`` is any mapping (or sequence of pairs, e.g. gRPC metadata) of request headers;
    names are matched case-insensitively. ``key`` may be a list of keys (rotation): any one
    that verifies is accepted.
    """
    values = _collect(headers)
    if values is None or any(name not in values for name in ALL_HEADERS):
        return None
    ts = values[TIMESTAMP]
    try:
        t = float(ts)
    except ValueError:
        return None
    if not math.isfinite(t) or abs(now - t) > max_age:
        return None
    keys = [key] if isinstance(key, (bytes, bytearray)) else list(key)
    presented = values[SIGNATURE].encode("utf-8", "replace")
    binding = Binding.of(method, path, values.get(REQUEST_ID, ""))
    ok = False
    for k in keys:
        # Compare every key (no early exit) in constant time per key.
        ok |= hmac.compare_digest(_mac(bytes(k), values, binding, ts).encode(), presented)
    if not ok:
        return None
    scopes = decode_scopes(values[SCOPES])
    admin = values[ADMIN]
    if scopes is None or admin not in ("true", "false"):
        return None
    return Identity(
        principal=values[PRINCIPAL],
        workspace=values[WORKSPACE],
        token_id=values[TOKEN_ID],
        scopes=scopes,
        admin=admin == "true",
        principal_kind=values[PRINCIPAL_KIND],
    )


__all__ = [
    "ADMIN",
    "ALL_HEADERS",
    "Binding",
    "MAX_AGE_SECONDS",
    "REQUEST_ID",
    "HEADER_PREFIX",
    "Identity",
    "PRINCIPAL",
    "PRINCIPAL_KIND",
    "SCOPES",
    "SIGNATURE",
    "SIGNED_HEADERS",
    "TIMESTAMP",
    "TOKEN_ID",
    "WORKSPACE",
    "decode_scopes",
    "encode_scopes",
    "may_query",
    "parse_key",
    "sign",
    "sign_identity",
    "verify",
]
