"""QuotaService: proto <-> domain, nothing else."""

from __future__ import annotations

from fmapi.quota.v1 import quota_pb2 as pb
from fmapi.quota.v1 import quota_pb2_grpc
from fmapi_common.errors import FmapiError, InvalidArgument, NotFound, rich_status

from .domain import Admission, Caller, RateLimit, Rule, Settlement
from .service import Admitted, QuotaService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["QuotaService"].full_name

_KINDS = {pb.PRINCIPAL_KIND_USER: "user", pb.PRINCIPAL_KIND_SERVICE_PRINCIPAL: "service_principal"}
_KEYS = {pb.LIMIT_KEY_ENDPOINT: "endpoint", pb.LIMIT_KEY_PRINCIPAL: "principal"}


def admission_from_pb(req: pb.AdmitRequest) -> Admission:
    kind = _KINDS.get(req.caller.principal_kind)
    if kind is None:
        raise InvalidArgument("'caller.principal_kind' must be set", param="caller.principal_kind")
    if any(r.key not in _KEYS for r in req.rules):
        raise InvalidArgument("every rule needs its key", param="rules")
    provisioned = req.capacity_mode == pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT
    if provisioned and req.provisioned_throughput.tokens_per_second <= 0:
        raise InvalidArgument("a provisioned-throughput endpoint needs its tokens_per_second",
                              param="provisioned_throughput")
    pt = req.provisioned_throughput if provisioned else pb.ProvisionedThroughput()
    return Admission(
        request_id=req.request_id,
        endpoint=req.endpoint,
        served_model=req.served_model,
        caller=Caller(req.caller.principal, kind, req.caller.token_id, req.caller.workspace),
        input_tokens=req.input_tokens,
        reserved_output_tokens=req.reserved_output_tokens,
        input_characters=req.input_characters,
        streaming=req.streaming,
        client_request_id=req.client_request_id,
        usage_context=dict(req.usage_context),
        rules=[Rule(_KEYS[r.key], r.requests_per_minute, r.input_tokens_per_minute,
                    r.output_tokens_per_minute, r.tokens_per_minute) for r in req.rules],
        tokens_per_second=pt.tokens_per_second,
        burst_seconds=pt.burst_seconds,
    )


def settlement_from_pb(request: pb.SettleRequest) -> Settlement:
    return Settlement(
        request_id=request.request_id,
        endpoint=request.endpoint,
        output_tokens=request.output_tokens,
        input_tokens=request.input_tokens if request.HasField("input_tokens") else None,
        status_code=request.status_code,
        time_to_first_token_ms=request.time_to_first_token_ms,
        duration_ms=request.duration_ms,
        finish_reason=request.finish_reason,
        output_characters=request.output_characters,
        payload=(request.payload.request_json, request.payload.response_json,
                 request.payload.logging_error_codes, request.payload.sampling_fraction)
        if request.HasField("payload") else None,
    )


def _outcome(o: bool | FmapiError) -> pb.SettleOutcome:
    """One settlement's answer in SettleMany: Settle's, as a result rather than a status."""
    if o is True:
        return pb.SettleOutcome(result=pb.SettleOutcome.RESULT_ALREADY_SETTLED)
    if o is False:
        return pb.SettleOutcome(result=pb.SettleOutcome.RESULT_SETTLED)
    result = (pb.SettleOutcome.RESULT_NOT_FOUND if isinstance(o, NotFound)
              else pb.SettleOutcome.RESULT_INVALID)
    return pb.SettleOutcome(result=result, message=o.message)


def _read(req: pb.AdmitRequest) -> Admission | FmapiError:
    """One admission of an AdmitMany, or why it cannot be read (that one is refused alone)."""
    try:
        return admission_from_pb(req)
    except FmapiError as exc:
        return exc


def _admitted(got: Admitted) -> pb.AdmitResponse:
    return pb.AdmitResponse(
        requests=_rate_limit(got.requests), tokens=_rate_limit(got.tokens),
        lease_expire_time_ms=got.lease_expire_time_ms, replayed=got.replayed,
        lease_remaining_ms=got.lease_remaining_ms,
    )


def _rate_limit(rl: RateLimit | None) -> pb.RateLimit | None:
    return None if rl is None else pb.RateLimit(limit=rl.limit, remaining=rl.remaining,
                                                reset_ms=rl.reset_ms)


class QuotaServicer(quota_pb2_grpc.QuotaServiceServicer):
    def __init__(self, service: QuotaService) -> None:
        self._service = service

    async def Admit(self, request, context):
        return _admitted(await self._service.admit(admission_from_pb(request)))

    async def AdmitMany(self, request, context):
        got = await self._service.admit_many([_read(r) for r in request.admissions])
        return pb.AdmitManyResponse(outcomes=[
            pb.AdmitOutcome(refused=rich_status(o).SerializeToString())
            if isinstance(o, FmapiError) else pb.AdmitOutcome(admitted=_admitted(o))
            for o in got])

    async def Settle(self, request, context):
        return pb.SettleResponse(already_settled=await self._service.settle(
            settlement_from_pb(request)))

    async def SettleMany(self, request, context):
        got = await self._service.settle_many(
            [settlement_from_pb(r) for r in request.settlements])
        return pb.SettleManyResponse(outcomes=[_outcome(o) for o in got])

    async def RenewLease(self, request, context):
        expiry = await self._service.renew(request.endpoint, request.request_id)
        return pb.RenewLeaseResponse(lease_expire_time_ms=expiry)

    async def GetCapacity(self, request, context):
        c = await self._service.capacity(request.endpoint)
        return pb.GetCapacityResponse(
            demand_tokens_per_second=c.demand_tokens_per_second,
            admitted_tokens_per_second=c.admitted_tokens_per_second,
            in_flight_requests=c.in_flight_requests,
            provisioned_tokens_per_second=c.provisioned_tokens_per_second,
        )
