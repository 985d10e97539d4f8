"""What a request asks of the quota, as token buckets; which limit to report.

Pure: no gRPC, no Redis.

Every limit is a token bucket per (endpoint, key, dimension): its capacity is the per-minute
limit and it refills continuously at limit/60 per second, so a caller may spend a minute's
budget at once and then one request's worth as soon as it has refilled. A provisioned-throughput
endpoint adds one bucket of ``tokens_per_second × burst_seconds`` refilled at
``tokens_per_second``, charged input + output tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from fmapi_common.errors import InvalidArgument

# Dimensions of a bucket: requests, input tokens, output tokens, input + output tokens together,
# provisioned throughput.
REQUESTS, INPUT, OUTPUT, TOTAL, THROUGHPUT = "r", "i", "o", "k", "t"
TOKEN_DIMS = (INPUT, OUTPUT, TOTAL, THROUGHPUT)

KeyKind = Literal["endpoint", "principal"]
PrincipalKind = Literal["user", "service_principal"]

# The same names routing accepts; no braces or colons, so keys and hash tags stay unambiguous.
_ENDPOINT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_ID = 128
MAX_NAME = 256
MAX_CONTEXT_ENTRIES, MAX_CONTEXT_KEY, MAX_CONTEXT_VALUE = 16, 64, 256
MAX_TOKENS = 2**40  # far above any real request; keeps every float in the scripts exact
# Request and response kept for an inference table: 1 MiB each at most (the gateway drops larger
# ones with a marker), so both together stay under the gRPC message limit.
MAX_PAYLOAD_CHARS = 2 * 2**20 + 1024


@dataclass(frozen=True)
class Rule:
    """One applicable limit (0 = unlimited in that dimension)."""

    key: KeyKind
    requests_per_minute: int = 0
    input_tokens_per_minute: int = 0
    output_tokens_per_minute: int = 0
    tokens_per_minute: int = 0


@dataclass(frozen=True)
class Caller:
    principal: str
    principal_kind: PrincipalKind = "user"
    token_id: str = ""
    workspace: str = ""


@dataclass
class Admission:
    """A request about to run, with everything the gateway knows about its limits."""

    request_id: str
    endpoint: str
    caller: Caller
    input_tokens: int
    reserved_output_tokens: int = 0
    served_model: str = ""
    streaming: bool = False
    client_request_id: str = ""
    usage_context: dict[str, str] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    # Provisioned throughput (0 = pay-per-token); burst 0 = the service's default.
    tokens_per_second: int = 0
    burst_seconds: float = 0.0
    input_characters: int = 0

    def record_fields(self) -> list[tuple[str, str]]:
        """The usage record's fields known at admission (the outcome is added at settlement)."""
        c = self.caller
        return [
            ("request_id", self.request_id),
            ("client_request_id", self.client_request_id),
            ("usage_context", json.dumps(self.usage_context, sort_keys=True)),
            ("endpoint", self.endpoint),
            ("served_model", self.served_model),
            ("principal", c.principal),
            ("principal_kind", c.principal_kind),
            ("token_id", c.token_id),
            ("workspace", c.workspace),
            ("streaming", "1" if self.streaming else "0"),
            ("input_characters", str(self.input_characters)),
        ]


@dataclass(frozen=True)
class Bucket:
    """One bucket a request is checked against and charged to."""

    dim: str
    # Who it limits, unique within the endpoint: "endpoint" or "p:<kind>:<principal>".
    who: str
    capacity: float
    per_ms: float  # refill rate
    amount: int  # what this request takes from it
    label: str  # for messages: "output tokens per minute for user alice"


@dataclass(frozen=True)
class RateLimit:
    """What OpenAI's x-ratelimit-* headers say about one dimension."""

    limit: int
    remaining: int
    reset_ms: int


@dataclass(frozen=True)
class BucketState:
    """A bucket right after admission."""

    remaining: int
    reset_ms: int  # until full again


@dataclass(frozen=True)
class Settlement:
    """What a finished request really used."""

    request_id: str
    endpoint: str
    output_tokens: int
    input_tokens: int | None = None  # None: as charged at admission
    status_code: int = 200
    time_to_first_token_ms: int = 0
    duration_ms: int = 0  # 0: measured from admission
    finish_reason: str = ""
    output_characters: int = 0
    # The inference-table entry (request JSON, response JSON, error codes, sampling fraction).
    payload: tuple[str, str, str, float] | None = None

    def extra_fields(self) -> list[str]:
        """Record fields beyond the outcome: field, value, ..."""
        out = ["output_characters", str(self.output_characters)]
        if self.payload is not None:
            req, resp, codes, fraction = self.payload
            out += ["payload_request", req, "payload_response", resp, "payload_errors", codes,
                    "payload_sampling", repr(fraction)]
        return out


def check_endpoint(name: str) -> None:
    if not _ENDPOINT.match(name):
        raise InvalidArgument(f"invalid endpoint name {name[:80]!r}", param="endpoint")


def check_request(request_id: str, endpoint: str) -> None:
    if not 0 < len(request_id) <= MAX_ID:
        raise InvalidArgument(f"'request_id' must have 1 to {MAX_ID} characters",
                              param="request_id")
    check_endpoint(endpoint)


def _check_counts(**counts: int) -> None:
    for name, n in counts.items():
        if not 0 <= n <= MAX_TOKENS:
            raise InvalidArgument(f"'{name}' must be between 0 and {MAX_TOKENS}", param=name)


def validate(a: Admission) -> None:
    """Refuse a malformed request (a gateway bug, not a caller's fault; never recorded)."""
    check_request(a.request_id, a.endpoint)
    if not 0 < len(a.caller.principal) <= MAX_NAME:
        raise InvalidArgument(f"'principal' must have 1 to {MAX_NAME} characters",
                              param="caller.principal")
    for name, value in (("served_model", a.served_model), ("caller.token_id", a.caller.token_id),
                        ("caller.workspace", a.caller.workspace)):
        if len(value) > MAX_NAME:
            raise InvalidArgument(f"'{name}' is longer than {MAX_NAME} characters", param=name)
    if len(a.client_request_id) > MAX_NAME:
        raise InvalidArgument(
            f"'client_request_id' is longer than {MAX_NAME} characters", param="client_request_id")
    ctx = a.usage_context
    if len(ctx) > MAX_CONTEXT_ENTRIES or any(
        len(k) > MAX_CONTEXT_KEY or len(v) > MAX_CONTEXT_VALUE for k, v in ctx.items()
    ):
        raise InvalidArgument(
            f"'usage_context' holds at most {MAX_CONTEXT_ENTRIES} entries, keys up to "
            f"{MAX_CONTEXT_KEY} and values up to {MAX_CONTEXT_VALUE} characters",
            param="usage_context",
        )
    _check_counts(input_tokens=a.input_tokens, reserved_output_tokens=a.reserved_output_tokens,
                  input_characters=a.input_characters)
    kinds = [r.key for r in a.rules]
    if len(set(kinds)) != len(kinds):
        raise InvalidArgument("at most one rule per key", param="rules")
    for r in a.rules:
        if min(r.requests_per_minute, r.input_tokens_per_minute, r.output_tokens_per_minute,
               r.tokens_per_minute) < 0:
            raise InvalidArgument("limits must not be negative", param="rules")
    if a.tokens_per_second < 0 or a.burst_seconds < 0:
        raise InvalidArgument("provisioned throughput must not be negative",
                              param="provisioned_throughput")


def validate_settlement(s: Settlement) -> None:
    check_request(s.request_id, s.endpoint)
    _check_counts(output_tokens=s.output_tokens, input_tokens=s.input_tokens or 0,
                  time_to_first_token_ms=s.time_to_first_token_ms, duration_ms=s.duration_ms,
                  output_characters=s.output_characters)
    if s.payload is not None:
        req, resp, codes, fraction = s.payload
        if len(req) + len(resp) > MAX_PAYLOAD_CHARS or len(codes) > 256 or not 0 < fraction <= 1:
            raise InvalidArgument(f"a payload holds at most {MAX_PAYLOAD_CHARS} characters and a "
                                  "sampling fraction in (0, 1]", param="payload")
    if not 0 <= s.status_code <= 999:
        raise InvalidArgument("'status_code' must be an HTTP status", param="status_code")
    if len(s.finish_reason) > 64:
        raise InvalidArgument("'finish_reason' is longer than 64 characters",
                              param="finish_reason")


def _who(a: Admission, key: KeyKind) -> tuple[str, str]:
    """(bucket id part, label part) of a rule's key."""
    if key == "endpoint":
        return "endpoint", "the endpoint"
    c = a.caller
    kind = c.principal_kind
    return f"p:{kind}:{c.principal}", f"{kind.replace('_', ' ')} {c.principal}"


def buckets(a: Admission, default_burst_seconds: float) -> list[Bucket]:
    """Every bucket the request is checked against and charged to (unlimited ones left out)."""
    out = []
    for r in a.rules:
        who, label = _who(a, r.key)
        for dim, limit, amount, what in (
            (REQUESTS, r.requests_per_minute, 1, "requests"),
            (INPUT, r.input_tokens_per_minute, a.input_tokens, "input tokens"),
            (OUTPUT, r.output_tokens_per_minute, a.reserved_output_tokens, "output tokens"),
            (TOTAL, r.tokens_per_minute, a.input_tokens + a.reserved_output_tokens, "tokens"),
        ):
            if limit > 0:
                out.append(Bucket(dim, who, float(limit), limit / 60_000, amount,
                                  f"{what} per minute for {label} (limit {limit})"))
    if a.tokens_per_second > 0:
        burst = a.burst_seconds or default_burst_seconds
        out.append(Bucket(
            THROUGHPUT, "endpoint", a.tokens_per_second * burst, a.tokens_per_second / 1000,
            a.input_tokens + a.reserved_output_tokens,
            f"the endpoint's provisioned throughput ({a.tokens_per_second} tokens per second, "
            f"bursts of {burst:g} s)",
        ))
    return out


def never_fits(a: Admission, bs: list[Bucket]) -> InvalidArgument | None:
    """The 400 for a request larger than some bucket's capacity: it could never be admitted."""
    for b in bs:
        if b.amount <= b.capacity:
            continue
        if b.dim == OUTPUT or (b.dim in (TOTAL, THROUGHPUT) and a.input_tokens <= b.capacity):
            return InvalidArgument(
                f"max_tokens ({a.reserved_output_tokens}) cannot fit in the {b.label}; "
                "lower max_tokens", param="max_tokens")
        return InvalidArgument(
            f"the input ({a.input_tokens} tokens) cannot fit in the {b.label}; shorten it",
            param="input")
    return None


def most_restrictive(bs: list[Bucket], states: list[BucketState], dims) -> RateLimit | None:
    """The bucket of ``dims`` with the least remaining (then the smallest limit), or None."""
    candidates = [(s.remaining, b.capacity, b, s) for b, s in zip(bs, states) if b.dim in dims]
    if not candidates:
        return None
    *_, b, s = min(candidates, key=lambda c: c[:2])
    return RateLimit(int(b.capacity), max(0, s.remaining), max(0, s.reset_ms))
