"""The quota's use cases: admit, settle, renew, reap, report capacity. No gRPC here."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import dataclass

import prometheus_client

from fmapi_common.errors import (
    FailedPrecondition,
    FmapiError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

from .domain import (
    INPUT,
    OUTPUT,
    REQUESTS,
    THROUGHPUT,
    TOKEN_DIMS,
    TOTAL,
    Admission,
    BucketState,
    RateLimit,
    Settlement,
    buckets,
    check_endpoint,
    check_request,
    most_restrictive,
    never_fits,
    validate,
    validate_settlement,
)
from .store import Capacity, QuotaStore

log = logging.getLogger(__name__)

REFUSALS = prometheus_client.Counter(
    "fmapi_quota_refusals", "Admissions refused (429), by endpoint and the kind of limit that refused",
    ["endpoint", "limit"])
_LIMIT_KINDS = {REQUESTS: "requests", INPUT: "input_tokens", OUTPUT: "output_tokens",
                TOTAL: "tokens", THROUGHPUT: "provisioned"}


@dataclass(frozen=True)
class Admitted:
    requests: RateLimit | None
    tokens: RateLimit | None
    lease_expire_time_ms: int
    replayed: bool
    # The lease's time left, on the store's clock (callers must not compare clocks).
    lease_remaining_ms: int = 0


# Admissions in one AdmitMany call, settlements in one SettleMany call, at most.
MAX_BATCH = 1000


def _settled(s: Settlement, out: str) -> bool:
    """The store's answer for one settlement: True when it had been settled before."""
    if out == "unknown":
        raise NotFound(f"no reservation for request {s.request_id!r} on endpoint "
                       f"{s.endpoint!r}", param="request_id")
    return out == "already"


class QuotaService:
    def __init__(self, store: QuotaStore, *, default_burst_seconds: float = 10.0) -> None:
        self._store = store
        self._burst = default_burst_seconds

    async def admit(self, a: Admission) -> Admitted:
        """Charge the request on every applicable bucket, or raise: ResourceExhausted (429,
        with when it would fit), InvalidArgument (400, it never could), Unavailable (Redis)."""
        bs, invalid = self._prepare(a)
        got = await self._store.admit(a, bs, refuse=400 if invalid else 0)
        return self._answer(a, bs, invalid, got)

    async def admit_many(self, admissions: list[Admission | FmapiError]) -> list[Admitted | FmapiError]:
        """:meth:`admit` for each, in order, in one round trip to Redis: for each, what
        :meth:`admit` returns or the error it would raise (an item already an error, e.g. one
        that could not be read, stays that error). Redis unreachable raises Unavailable."""
        if len(admissions) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} admissions per call", param="admissions")
        prepared: list[tuple[Admission, list, InvalidArgument | None] | FmapiError] = []
        for a in admissions:
            try:
                if isinstance(a, FmapiError):
                    raise a
                prepared.append((a, *self._prepare(a)))
            except FmapiError as exc:
                prepared.append(exc)
        ok = [p for p in prepared if not isinstance(p, FmapiError)]
        answers = iter(await self._store.admit_many(
            [(a, bs, 400 if invalid else 0) for a, bs, invalid in ok]))
        out: list[Admitted | FmapiError] = []
        for p in prepared:
            if isinstance(p, FmapiError):
                out.append(p)
                continue
            try:
                out.append(self._answer(*p, next(answers)))
            except FmapiError as exc:
                out.append(exc)
        return out

    def _prepare(self, a: Admission):
        """The buckets ``a`` charges, and why it could never fit (None when it could)."""
        validate(a)
        bs = buckets(a, self._burst)
        return bs, never_fits(a, bs)

    def _answer(self, a: Admission, bs, invalid: InvalidArgument | None, got) -> Admitted:
        """The admission script's answer for ``a``, or the refusal it means."""
        ans, now = got.answer, got.now_ms
        status = ans["s"]
        if status == "admitted":
            # The bucket states as of now (a replay's are as of its first admission).
            elapsed = now - float(ans["at"])
            states = [BucketState(int(left), math.ceil(ms - elapsed))
                      for left, ms in ans.get("st") or []]
            return Admitted(
                requests=most_restrictive(bs, states, (REQUESTS,)),
                tokens=most_restrictive(bs, states, TOKEN_DIMS),
                lease_expire_time_ms=int(got.lease_ms),
                replayed=got.replayed,
                lease_remaining_ms=max(0, int(got.lease_ms - now)),
            )
        if status == "refused":
            retry = max(1, math.ceil(float(ans["at"]) - now)) / 1000
            b = ans["b"]
            what = bs[b].label if 0 <= b < len(bs) else "a limit"
            REFUSALS.labels(a.endpoint, _LIMIT_KINDS.get(bs[b].dim, "other") if 0 <= b < len(bs)
                            else "other").inc()
            raise ResourceExhausted(
                f"rate limit exceeded on endpoint {a.endpoint!r}: {what}; "
                f"retry in {retry:.3f} s",
                retry_after=retry,
            )
        if status == "invalid":
            raise invalid or InvalidArgument("this request can never fit the endpoint's limits")
        if status == "backlog":
            REFUSALS.labels(a.endpoint, "usage_backlog").inc()
            log.warning("endpoint %r: %s usage records wait for the SQL writer; refusing new "
                        "requests until it catches up", a.endpoint, ans.get("n"))
            raise Unavailable(
                f"usage records of endpoint {a.endpoint!r} cannot be written to the database "
                "right now; new requests are refused until they are (retry later)",
                retry_after=5.0, reason="usage_backlog")
        raise FailedPrecondition(f"request {a.request_id!r} has already been settled",
                                 param="request_id")

    async def settle(self, s: Settlement) -> bool:
        """Refund and record; returns True when the request had been settled before."""
        validate_settlement(s)
        return _settled(s, await self._store.settle(s))

    async def settle_many(self, settlements: list[Settlement]) -> list[bool | FmapiError]:
        """:meth:`settle` for each, in one round trip to Redis: for each, True / False as
        :meth:`settle` returns, or the error it would raise (a bad or unknown settlement fails
        alone). Redis unreachable raises Unavailable for all."""
        if len(settlements) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} settlements per call",
                                  param="settlements")
        checked: list[FmapiError | None] = []
        for s in settlements:
            try:
                validate_settlement(s)
                checked.append(None)
            except InvalidArgument as exc:
                checked.append(exc)
        valid = [s for s, err in zip(settlements, checked) if err is None]
        stored = iter(zip(valid, await self._store.settle_many(valid)))
        out: list[bool | FmapiError] = []
        for err in checked:
            if err is None:
                s, answer = next(stored)
                try:
                    out.append(_settled(s, answer))
                except NotFound as exc:
                    out.append(exc)
            else:
                out.append(err)
        return out

    async def renew(self, endpoint: str, request_id: str) -> int:
        check_request(request_id, endpoint)
        expiry = await self._store.renew(endpoint, request_id)
        if expiry is None:
            raise NotFound(f"no reservation for request {request_id!r} on endpoint {endpoint!r} "
                           "(settled, or expired and settled at its reserved size)",
                           param="request_id")
        return int(expiry)

    async def capacity(self, endpoint: str) -> Capacity:
        check_endpoint(endpoint)
        return await self._store.capacity(endpoint)

    async def reap_forever(self, interval: float) -> None:
        """Settle expired leases every ``interval`` seconds (jittered), until cancelled. Every
        replica runs this; the reap script makes concurrent reapers safe."""
        while True:
            await asyncio.sleep(interval * random.uniform(0.5, 1.5))
            try:
                n = await self._store.reap()
                if n:
                    log.info("settled %d expired reservation(s) at their reserved size", n)
            except FmapiError as exc:
                log.warning("reaper: %s", exc.message)
            except Exception:
                log.exception("reaper failed")
