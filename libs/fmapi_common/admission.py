"""Admissions to the quota service, as the gateway and the model servers make them.

Both admit: the gateway for generation requests (after the model server counted them), the
embedding server for the embedding requests the gateway hands it with their admission attached
(it tokenizes them anyway, so the count costs no extra call). Admissions that queue up while an
``AdmitMany`` call is in flight go together in the next one (:class:`Coalescer`); an admission
whose caller went away before it was sent is never sent. A quota service older than
``AdmitMany`` (a rolling upgrade) gets one ``Admit`` per admission.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from fmapi.quota.v1 import quota_pb2 as pb
from fmapi.quota.v1 import quota_pb2_grpc

from .coalesce import Coalescer
from .errors import FmapiError, Unavailable, from_rpc_error, from_status, rpc_error_status

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

    def __init__(self, stub: quota_pb2_grpc.QuotaServiceStub, timeout: float) -> None:
        self._stub = stub
        self._timeout = timeout
        self._coalescer: Coalescer[pb.AdmitRequest, pb.AdmitOutcome] = Coalescer(
            self._admit_many, max_count=MAX_COUNT, max_bytes=MAX_BYTES, size=_byte_size,
            withdraw=True)

    async def outcome(self, req: pb.AdmitRequest) -> pb.AdmitOutcome:
        return await self._coalescer.submit(req)

    async def admit(self, req: pb.AdmitRequest) -> pb.AdmitResponse:
        out = await self.outcome(req)
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
