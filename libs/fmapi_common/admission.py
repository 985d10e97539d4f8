"""Admissions to the quota service, as the gateway and the model servers make them.

The gateway builds every admission; the model server the request runs on makes it (the gateway
hands it over attached to the request): the server tokenizes the request anyway, so it fills in
the exact token counts and admits before its engine sees the request, and no separate counting
call is needed. (The gateway admits itself only what it must count first: a completions call
with several prompts, or a request to a model server too old to admit.) Admissions that queue up while an
``AdmitMany`` call is in flight go together in the next one (:class:`Coalescer`); an admission
whose caller went away before it was sent is never sent. An admission whose request cannot run
yet anyway (every lane of the embedding server's model is busy) may wait a little for company
(``linger``), until the server has a free lane with nothing ready for it (:meth:`Admitter.flush`).
A quota service older than ``AdmitMany`` (a rolling upgrade) gets one ``Admit`` per admission.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from fmapi.quota.v1 import quota_pb2 as pb
from fmapi.quota.v1 import quota_pb2_grpc

from .channels import make_channel
from .coalesce import Coalescer
from .errors import (
    FailedPrecondition,
    FmapiError,
    Unavailable,
    from_rpc_error,
    from_status,
    rpc_error_status,
)
from .tls import QUOTA, TlsFiles

# At most this many admissions, or bytes of them, in one AdmitMany call (the quota service
# takes 1000 and 4 MiB).
MAX_COUNT = 256
MAX_BYTES = 2 * 2**20


def _byte_size(msg: Message) -> int:
    return msg.ByteSize()


class Admitter:
    """``await admit(req)``: the quota service's answer, or the :class:`FmapiError` that refused
    the request (429, 400, 503 ``usage_backlog``); a call that failed raises ``grpc.RpcError``
    (the admission may have happened with its answer lost: the caller closes it)."""

    def __init__(self, stub: quota_pb2_grpc.QuotaServiceStub, timeout: float,
                 channel: grpc.aio.Channel | None = None) -> None:
        self._stub = stub
        self._timeout = timeout
        self._channel = channel
        self._coalescer: Coalescer[pb.AdmitRequest, pb.AdmitOutcome] = Coalescer(
            self._admit_many, max_count=MAX_COUNT, max_bytes=MAX_BYTES, size=_byte_size,
            withdraw=True)

    @classmethod
    def connect(cls, address: str, tls: TlsFiles | None, timeout: float) -> Admitter:
        """An admitter with a channel of its own to the quota service at ``address`` (one
        replica, or several comma-separated)."""
        channel = make_channel(address, tls, QUOTA)
        return cls(quota_pb2_grpc.QuotaServiceStub(channel), timeout, channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def outcome(self, req: pb.AdmitRequest, *, linger: float = 0.0) -> pb.AdmitOutcome:
        """``linger``: seconds ``req`` may wait for company when no call is in flight."""
        return await self._coalescer.submit(req, linger=linger)

    def flush(self) -> None:
        """Admissions waiting for company go now."""
        self._coalescer.flush()

    async def admit(self, req: pb.AdmitRequest, *, linger: float = 0.0) -> pb.AdmitResponse:
        out = await self.outcome(req, linger=linger)
        if out.WhichOneof("outcome") != "admitted":  # refused: nothing was charged
            raise refusal(out)
        return out.admitted

    async def _admit_many(self, reqs: list[pb.AdmitRequest]) -> list[pb.AdmitOutcome]:
        try:
            resp = await self._stub.AdmitMany(pb.AdmitManyRequest(admissions=reqs),
                                              timeout=self._timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            # A quota service older than AdmitMany (a rolling upgrade): one call each.
            return list(await asyncio.gather(*(self._admit_one(r) for r in reqs)))
        return list(resp.outcomes)

    async def _admit_one(self, req: pb.AdmitRequest) -> pb.AdmitOutcome:
        try:
            return pb.AdmitOutcome(admitted=await self._stub.Admit(req, timeout=self._timeout))
        except grpc.RpcError as exc:
            return pb.AdmitOutcome(refused=rpc_error_status(exc).SerializeToString())


class Admit(Protocol):
    """Admission of a request of ``input_tokens``, reserving ``reserved_output_tokens``: the
    quota service's answer, or the refusal raised. ``linger``: seconds the admission may wait
    for company (its request cannot run sooner anyway)."""

    async def __call__(self, input_tokens: int, reserved_output_tokens: int, *,
                       linger: float = 0.0) -> pb.AdmitResponse: ...


def admitting(admitter: Admitter | None, req: pb.AdmitRequest, server: str) -> Admit:
    """How a model server admits ``req``, the admission a request arrived with, once it has
    counted the request. A server without a quota service refuses (FAILED_PRECONDITION) rather
    than run the request unmetered."""
    if admitter is None:
        raise FailedPrecondition(f"this {server} server has no quota service to admit the "
                                 f"request with (set FMAPI_{server.upper()}_QUOTA_ADDR)")

    async def admit(input_tokens: int, reserved_output_tokens: int, *,
                    linger: float = 0.0) -> pb.AdmitResponse:
        req.input_tokens = input_tokens
        req.reserved_output_tokens = reserved_output_tokens
        try:
            return await admitter.admit(req, linger=linger)
        except grpc.RpcError as exc:
            raise unreachable(exc) from None

    return admit


def refusal(out: pb.AdmitOutcome) -> FmapiError:
    """The error a refused admission's outcome carries (the quota service's, details and all)."""
    return from_status(status_pb2.Status.FromString(out.refused))


def unreachable(exc: grpc.RpcError) -> FmapiError:
    """What a caller is told when the admission call itself failed: nothing ran unmetered."""
    err = from_rpc_error(exc)
    if isinstance(err, Unavailable) and err.retry_after is None:  # the service itself is down
        return Unavailable("metering is unavailable (the quota service cannot be reached), so "
                           "the request was not run; retry shortly", retry_after=1.0)
    return err
