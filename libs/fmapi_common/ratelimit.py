"""OpenAI's rate-limit headers, written from what the quota service answered at admission."""

from __future__ import annotations

from typing import Protocol


class RateLimitLike(Protocol):
    """``fmapi.quota.v1.RateLimit`` or anything with the same three fields."""

    limit: int
    remaining: int
    reset_ms: int


def format_duration(ms: int) -> str:
    """A duration the way OpenAI's x-ratelimit-reset-* headers write it (Go's style):
    ``12ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h0m0s``."""
    ms = max(0, int(ms))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, frac = divmod(rest, 1000)
    secs = f"{s}.{frac:03d}".rstrip("0").rstrip(".") + "s"
    if h:
        return f"{h}h{m}m{secs}"
    if m:
        return f"{m}m{secs}"
    return secs


def ratelimit_headers(requests: RateLimitLike | None, tokens: RateLimitLike | None) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the most restrictive limit."""
    out = {}
    for name, rl in (("requests", requests), ("tokens", tokens)):
        if rl is not None:
            out[f"x-ratelimit-limit-{name}"] = str(rl.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(rl.remaining)
            out[f"x-ratelimit-reset-{name}"] = format_duration(rl.reset_ms)
    return out
