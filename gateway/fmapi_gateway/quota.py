"""Metering: admission before any engine work, and settlement exactly once when a request ends.

The gateway knows the endpoint (and so its limits) and the caller; the model server knows the
exact token counts. The gateway builds the admission (:meth:`Quota.admission`) and the model
server the request runs on fills in the counts and makes it (``fmapi_common.admission``); where
the gateway must count first (``CountTokens``), :meth:`Quota.admit` makes it. Either way one call
to the quota service checks and charges every applicable limit atomically or refuses (429 with
``Retry-After``, 400 when the request could never fit, 503 when metering is unreachable: nothing
runs unmetered). The :class:`Meter` made from its answer carries OpenAI's rate-limit headers and
settles the request once — with what was really generated, its status and timings — however the
request ends: normally, with an error, or because the client went away.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
import orjson
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry import trace

from fmapi.quota.v1 import quota_pb2 as pb
from fmapi.quota.v1 import quota_pb2_grpc
from fmapi.routing.v1 import routing_pb2
from fmapi_common.admission import MAX_BYTES, MAX_COUNT, Admitter, refusal, unreachable
from fmapi_common.channels import make_channel
from fmapi_common.coalesce import Coalescer
from fmapi_common.errors import (
    FmapiError,
    InvalidArgument,
    to_http,
)
from fmapi_common.identity import Identity
from fmapi_common.ratelimit import ratelimit_headers
from fmapi_common.tls import QUOTA, TlsFiles

from . import metrics

log = logging.getLogger(__name__)

_OPERATIONS = {routing_pb2.TASK_CHAT: "chat", routing_pb2.TASK_COMPLETIONS: "completions",
               routing_pb2.TASK_EMBEDDINGS: "embeddings"}
_KINDS = {"user": pb.PRINCIPAL_KIND_USER, "service_principal": pb.PRINCIPAL_KIND_SERVICE_PRINCIPAL}
# The HTTP status recorded for a client that went away before the end (nginx's convention).
CLIENT_CLOSED = 499


def status_of(exc: BaseException) -> int:
    """The HTTP status of a request that ended with ``exc`` (what its usage record says)."""
    if isinstance(exc, FmapiError):
        return to_http(exc).status
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return CLIENT_CLOSED
    return 500


def _rule(key: int, limits) -> pb.LimitRule | None:
    values = (limits.requests_per_minute, limits.input_tokens_per_minute,
              limits.output_tokens_per_minute, limits.tokens_per_minute)
    if not any(values):
        return None
    return pb.LimitRule(key=key, requests_per_minute=values[0], input_tokens_per_minute=values[1],
                        output_tokens_per_minute=values[2], tokens_per_minute=values[3])


def service_principal_default(limits: routing_pb2.Limits) -> routing_pb2.RateLimits | routing_pb2.Limits:
    """Service principals' default: their own when the endpoint has one (even empty: none),
    else every principal's (the per-minute fields of ``limits``)."""
    if limits.HasField("service_principal_default"):
        return limits.service_principal_default
    return limits


def rules(limits: routing_pb2.Limits, principal: str, principal_kind: str = "user") -> list[pb.LimitRule]:
    """The limits that apply to ``principal``: the endpoint's ceiling for everyone together, and
    the principal's own (its named override when there is one, else its kind's default)."""
    default = service_principal_default(limits) if principal_kind == "service_principal" else limits
    own = next((p.limits for p in limits.principals if p.principal == principal), default)
    found = (_rule(pb.LIMIT_KEY_ENDPOINT, limits.endpoint), _rule(pb.LIMIT_KEY_PRINCIPAL, own))
    return [r for r in found if r is not None]


def _usage_context(value) -> dict[str, str]:
    """Databricks' ``usage_context`` (a flat object) as strings; anything else is a 400."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidArgument("'usage_context' must be an object", param="usage_context")
    out = {}
    for k, v in value.items():
        if isinstance(v, (dict, list)):
            raise InvalidArgument("'usage_context' values must be strings or numbers",
                                  param="usage_context")
        out[k] = "" if v is None else str(v)
    return out


@dataclass(frozen=True)
class UsageTags:
    """What identifies a request in its usage record: the gateway's request id (Envoy's, never
    the client's: it is the idempotency key of admission), and what the caller attached."""

    request_id: str
    client_request_id: str = ""
    usage_context: dict[str, str] = field(default_factory=dict)
    # The request as the caller sent it (its JSON body, or the gRPC request message; never a
    # header): the inference table's copy.
    body: Mapping | Message | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_body(cls, request_id: str, body: Mapping) -> UsageTags:
        """Databricks' ``client_request_id`` and ``usage_context`` from a request body."""
        return cls(request_id, _client_request_id(body.get("client_request_id")),
                   _usage_context(body.get("usage_context")), body)


# Payloads kept in an inference table: at most this many bytes of JSON each, else a marker.
MAX_PAYLOAD_BYTES = 2**20


def _payload_json(value, code: str) -> tuple[str, str]:
    """(JSON text, "") or ("", ``code``) when it is over :data:`MAX_PAYLOAD_BYTES`."""
    if isinstance(value, Message):
        value = json_format.MessageToDict(value, preserving_proto_field_name=True)
    text = orjson.dumps(value, default=str)
    if len(text) > MAX_PAYLOAD_BYTES:
        return "", code
    return text.decode(), ""


class Meter:
    """One admitted request: its rate-limit headers, and its settlement (exactly once). A
    request sampled for its endpoint's inference table (``capture``: the sampling fraction) is
    settled with its request and response."""

    def __init__(self, quota: Quota, request_id: str, endpoint: str, admitted: pb.AdmitResponse,
                 started: float, capture: tuple[Mapping, float] | None = None, *,
                 principal_kind: str = "user", input_tokens: int = 0) -> None:
        self.capture = capture
        self._principal_kind = principal_kind
        self._input_tokens = input_tokens
        # The request's server span (REST or gRPC): its GenAI attributes are set here.
        self._span = trace.get_current_span()
        self._quota = quota
        self.request_id = request_id
        self.endpoint = endpoint
        self.headers = ratelimit_headers(
            admitted.requests if admitted.HasField("requests") else None,
            admitted.tokens if admitted.HasField("tokens") else None,
        )
        self._started = started
        self._first_token: float | None = None
        self._settled = False
        # A request running longer than a third of its lease renews it (else the reaper would
        # settle it at its reserved size mid-stream); the lease is timed on the store's clock.
        self.renew_every = max(1.0, admitted.lease_remaining_ms / 3000)
        self.renewed_at = started
        quota.running[request_id] = self

    def first_token(self) -> None:
        if self._first_token is None:
            self._first_token = time.monotonic()
            self._span.add_event(metrics.FIRST_TOKEN_EVENT, {
                metrics.TTFT_ATTRIBUTE: self._first_token - self._started})

    def settle(self, *, output_tokens: int, status_code: int, finish_reason: str = "",
               input_tokens: int | None = None, output_characters: int = 0,
               response=None) -> None:
        """Settle once (later calls do nothing), in a task of its own: a caller being cancelled
        (a client gone away) never cancels its settlement."""
        if self._settled:
            return
        self._settled = True
        self._quota.running.pop(self.request_id, None)
        now = time.monotonic()
        req = pb.SettleRequest(
            request_id=self.request_id,
            endpoint=self.endpoint,
            output_tokens=max(0, output_tokens),
            status_code=status_code,
            time_to_first_token_ms=int((self._first_token - self._started) * 1000)
            if self._first_token is not None else 0,
            duration_ms=int((now - self._started) * 1000),
            finish_reason=finish_reason,
            output_characters=max(0, output_characters),
        )
        if input_tokens is not None:
            req.input_tokens = input_tokens
        metrics.settled_span(self._span, input_tokens=self._input_tokens if input_tokens is None
                             else input_tokens, output_tokens=req.output_tokens,
                             finish_reason=finish_reason, status_code=status_code)
        metrics.finished(
            self.endpoint, status_code, self._principal_kind, duration=now - self._started,
            ttft=None if self._first_token is None else self._first_token - self._started,
            input_tokens=self._input_tokens if input_tokens is None else input_tokens,
            output_tokens=req.output_tokens)
        self._quota.spawn(self._settle(req, response))

    async def _settle(self, req: pb.SettleRequest, response) -> None:
        """The settlement call, with the inference table's payloads when this request is
        sampled: turned into JSON here, in the settlement's own task, after the caller has its
        answer (never on the request path)."""
        if self.capture is not None:
            body, fraction = self.capture
            request_json, req_code = _payload_json(body, "REQUEST_PAYLOAD_TOO_LARGE")
            response_json, resp_code = ("", "") if response is None else _payload_json(
                response() if callable(response) else response, "RESPONSE_PAYLOAD_TOO_LARGE")
            req.payload.CopyFrom(pb.Payload(
                request_json=request_json, response_json=response_json,
                logging_error_codes=",".join(c for c in (req_code, resp_code) if c),
                sampling_fraction=fraction))
        await self._quota.settle(req)


class Quota:
    def __init__(self, address: str, tls: TlsFiles | None, timeout: float = 5.0,
                 settle_linger: float = 0.0) -> None:
        self._channel = make_channel(address, tls, QUOTA)
        self._stub = quota_pb2_grpc.QuotaServiceStub(self._channel)
        self._timeout = timeout
        self._tasks: set[asyncio.Task] = set()  # settlements in flight
        # Admitted requests not settled yet; one loop renews the leases of the long ones.
        self.running: dict[str, Meter] = {}
        self._renewer: asyncio.Task | None = None
        # Admissions and settlements travel in AdmitMany / SettleMany calls: those that queue
        # up while a call of their kind is in flight go together in the next one (at most
        # 256, or 2 MiB: a settlement with large inference-table payloads goes alone, under
        # the quota service's 4 MiB message limit). An admission whose caller went away
        # before it was sent is never sent; a settlement always is. A settlement that finds
        # no call in flight waits ``settle_linger`` seconds for company (its caller already
        # has its answer): see fmapi_common.coalesce.
        self._admitter = Admitter(self._stub, timeout)
        self._settlements: Coalescer[pb.SettleRequest, None] = Coalescer(
            self._settle_many, max_count=MAX_COUNT, max_bytes=MAX_BYTES, size=_byte_size,
            linger=settle_linger)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._tasks:  # let pending settlements finish before the channel goes
            await asyncio.wait(self._tasks, timeout=self._timeout)
        await self._channel.close()

    async def _renew_leases(self, tick: float = 1.0) -> None:
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for m in list(self.running.values()):
                if now - m.renewed_at >= m.renew_every:
                    m.renewed_at = now
                    self.spawn(self.renew(m.request_id, m.endpoint))

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def admission(
        self,
        *,
        tags: UsageTags,
        endpoint: routing_pb2.Endpoint,
        model: str,
        caller: Identity,
        input_tokens: int,
        output_tokens: int,
        streaming: bool,
        input_characters: int = 0,
        sampling=None,
    ) -> pb.AdmitRequest:
        """The admission of a request: charge ``input_tokens`` and reserve ``output_tokens`` on
        every applicable limit. Made here (:meth:`admit`) or by the model server the request
        runs on, which fills in the token counts itself."""
        metrics.admitted_span(
            trace.get_current_span(), operation=_OPERATIONS.get(endpoint.task, ""),
            endpoint=endpoint.name, model=model, principal=caller.principal,
            principal_kind=caller.principal_kind, request_id=tags.request_id, sampling=sampling)
        req = pb.AdmitRequest(
            request_id=tags.request_id,
            endpoint=endpoint.name,
            served_model=model,
            capacity_mode=endpoint.capacity_mode,
            caller=pb.Caller(principal=caller.principal, principal_kind=_KINDS.get(caller.principal_kind, 0),
                             token_id=caller.token_id, workspace=caller.workspace),
            input_tokens=input_tokens,
            reserved_output_tokens=output_tokens,
            streaming=streaming,
            client_request_id=tags.client_request_id,
            usage_context=tags.usage_context,
            rules=rules(endpoint.limits, caller.principal, caller.principal_kind),
            input_characters=input_characters,
        )
        if endpoint.capacity_mode == routing_pb2.CAPACITY_MODE_PROVISIONED_THROUGHPUT:
            # Admitted against the capacity the endpoint is provisioned up to.
            req.provisioned_throughput.tokens_per_second = endpoint.provisioned_throughput.max_tokens_per_second
        return req

    async def admit(self, *, tags: UsageTags, endpoint: routing_pb2.Endpoint, caller: Identity,
                    input_param: str, **kw) -> Meter:
        """Admit (one call to the quota service) or raise (429 / 400 naming ``input_param`` or
        ``max_tokens`` / 503); ``kw`` as :meth:`admission` takes them."""
        started = time.monotonic()
        req = self.admission(tags=tags, endpoint=endpoint, caller=caller, **kw)
        try:
            out = await self._admitter.outcome(req)
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            self.close_unknown(req, CLIENT_CLOSED if isinstance(exc, asyncio.CancelledError)
                               else 503)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise _admission_error(unreachable(exc), input_param) from None
        if out.WhichOneof("outcome") != "admitted":  # refused: nothing was charged
            raise _admission_error(refusal(out), input_param)
        return self.meter(req, out.admitted, started, endpoint, tags, caller)

    def meter(self, req: pb.AdmitRequest, admitted: pb.AdmitResponse, started: float,
              endpoint: routing_pb2.Endpoint, tags: UsageTags, caller: Identity) -> Meter:
        """The :class:`Meter` of a request admitted with ``admitted`` (by :meth:`admit`, or by
        the model server the request ran on)."""
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())
        return Meter(self, req.request_id, endpoint.name, admitted, started,
                     _sampled(endpoint, tags), principal_kind=caller.principal_kind,
                     input_tokens=req.input_tokens)

    def close_unknown(self, req: pb.AdmitRequest, status: int) -> None:
        """Close an admission whose answer never came (it may have happened with its answer
        lost) at once, rather than at its lease's end: it never ran, so nothing charged stays
        charged (settling a request that was never admitted does nothing)."""
        self.spawn(self.settle(pb.SettleRequest(request_id=req.request_id,
                                                endpoint=req.endpoint, status_code=status,
                                                finish_reason="not_run", input_tokens=0)))

    async def renew(self, request_id: str, endpoint: str) -> None:
        try:
            await self._stub.RenewLease(pb.RenewLeaseRequest(request_id=request_id, endpoint=endpoint),
                                        timeout=self._timeout)
        except (grpc.RpcError, grpc.aio.UsageError) as exc:
            log.warning("could not renew the lease of request %s: %s", request_id, exc)

    async def settle(self, req: pb.SettleRequest) -> None:
        """Settle ``req``: it goes in the next SettleMany call (returns once that answered)."""
        await self._settlements.submit(req)

    async def _settle_many(self, reqs: list[pb.SettleRequest]) -> list[None]:
        """Never raises: a settlement that fails is logged, and its lease settles it at its
        reserved size (as when Settle fails)."""
        try:
            resp = await self._stub.SettleMany(pb.SettleManyRequest(settlements=reqs),
                                               timeout=self._timeout)
        except (grpc.RpcError, grpc.aio.UsageError) as exc:  # UsageError: closed (shutdown)
            if isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # A quota service older than SettleMany (a rolling upgrade): one call each.
                for req in reqs:
                    await self._settle_one(req)
                return [None] * len(reqs)
            what = exc.code().name if isinstance(exc, grpc.RpcError) else str(exc)
            log.error("settlement of %d request(s) failed (%s): their leases will settle them: "
                      "%s", len(reqs), what, ", ".join(r.request_id for r in reqs[:20]))
            return [None] * len(reqs)
        for req, out in zip(reqs, resp.outcomes):
            if out.result == pb.SettleOutcome.RESULT_NOT_FOUND:  # never admitted (lost admission)
                log.debug("nothing to settle for request %s", req.request_id)
            elif out.result == pb.SettleOutcome.RESULT_INVALID:
                log.error("settlement of request %s was refused (%s): its lease will settle it",
                          req.request_id, out.message)
        return [None] * len(reqs)

    async def _settle_one(self, req: pb.SettleRequest) -> None:
        try:
            await self._stub.Settle(req, timeout=self._timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # never admitted (a lost admission)
                log.debug("nothing to settle for request %s", req.request_id)
                return
            log.error("settlement of request %s failed (%s): its lease will settle it",
                      req.request_id, exc.code().name)
        except grpc.aio.UsageError as exc:  # the channel closed under it (shutdown)
            log.error("settlement of request %s failed (%s): its lease will settle it",
                      req.request_id, exc)


def _byte_size(msg: Message) -> int:
    return msg.ByteSize()


def _sampled(endpoint: routing_pb2.Endpoint, tags: UsageTags) -> tuple[Mapping, float] | None:
    """The request's body and the sampling fraction when this request goes to the endpoint's
    inference table (it keeps one, and this request falls in its sample)."""
    table = endpoint.ai_gateway.inference_table
    if not table.enabled or tags.body is None:
        return None
    fraction = table.sampling_fraction or 1.0
    return (tags.body, fraction) if random.random() < fraction else None


def _client_request_id(value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 128:
        raise InvalidArgument("'client_request_id' must be a string of at most 128 characters",
                              param="client_request_id")
    return value


def _admission_error(err: FmapiError, input_param: str) -> FmapiError:
    if err.param == "input":
        err.param = input_param
    return err
