"""fmapi's usage API (its own paths; the managed product answers these with SQL on system
tables): totals of the caller's usage, everyone's for admins, and endpoints' inference tables.

    GET /api/2.0/usage?since=&until=&by=endpoint,principal,token,day,served_entity,status
        -> {"since", "until", "by": [...], "groups": [{<key>: value, ..., "requests",
            "input_tokens", "output_tokens", "input_characters", "output_characters"}]}
    GET /api/2.0/serving-endpoints/{name}/inference-table?since=&limit=   (admins)
        -> {"rows": [{"request_id", "request_time", "status_code", "request", "response", ...}]}

``since``/``until`` are ISO-8601 times (UTC when no offset is given) or a duration back from now
(``30m``, ``12h``, ``7d``); the defaults are the last 7 days, until now.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import json_format, timestamp_pb2

from fmapi.usage.v1 import usage_pb2 as pb
from fmapi.usage.v1 import usage_pb2_grpc
from fmapi_common.channels import make_channel
from fmapi_common.errors import InvalidArgument, Unavailable, from_rpc_error
from fmapi_common.identity import Identity
from fmapi_common.tls import USAGE, TlsFiles

_AGO = re.compile(r"^(\d{1,6})([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
DEFAULT_WINDOW = timedelta(days=7)
MAX_PAYLOAD_ROWS = 1000


def parse_time(value: str | None, param: str, now: datetime, default: datetime) -> datetime:
    if value is None or value == "":
        return default
    if m := _AGO.match(value):
        try:
            return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        except OverflowError:
            raise InvalidArgument(f"'{param}' reaches back before the year 1", param=param) from None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(f"'{param}' must be an ISO-8601 time or a duration such as 7d, "
                              f"12h or 30m", param=param) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _ts(when: datetime, param: str) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    try:
        ts.FromDatetime(when)
    except (OverflowError, ValueError):
        raise InvalidArgument(f"'{param}' is outside the years 1 to 9999", param=param) from None
    return ts


class UsageApi:
    def __init__(self, address: str | None, tls: TlsFiles | None) -> None:
        self._channel = make_channel(address, tls, USAGE) if address else None
        self._stub = usage_pb2_grpc.UsageServiceStub(self._channel) if self._channel else None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def _call(self, method: str, request):
        if self._stub is None:
            raise Unavailable("this gateway has no usage service configured")
        try:
            return await getattr(self._stub, method)(request, timeout=30)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def usage(self, caller: Identity, query) -> dict:
        now = datetime.now(UTC)
        until = parse_time(query.get("until"), "until", now, now)
        since = parse_time(query.get("since"), "since", now, until - DEFAULT_WINDOW)
        by = [b for b in (query.get("by") or "").split(",") if b]
        req = pb.QueryUsageRequest(since=_ts(since, "since"), until=_ts(until, "until"),
                                   group_by=by,
                                   principal="" if caller.admin else caller.principal)
        resp = await self._call("QueryUsage", req)
        return {
            "since": since.isoformat(), "until": until.isoformat(), "by": by,
            # Everyone but admins sees their own records only.
            "principal": None if caller.admin else caller.principal,
            "groups": [{**dict(g.key), "requests": g.requests, "input_tokens": g.input_tokens,
                        "output_tokens": g.output_tokens, "input_characters": g.input_characters,
                        "output_characters": g.output_characters} for g in resp.groups],
        }

    async def payloads(self, endpoint: str, query) -> dict:
        now = datetime.now(UTC)
        since = parse_time(query.get("since"), "since", now, now - DEFAULT_WINDOW)
        try:
            limit = int(query.get("limit") or 100)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_PAYLOAD_ROWS:
            raise InvalidArgument(f"'limit' must be a whole number from 1 to {MAX_PAYLOAD_ROWS}",
                                  param="limit")
        resp = await self._call("QueryPayloads", pb.QueryPayloadsRequest(
            endpoint=endpoint, since=_ts(since, "since"), limit=limit))
        return {"rows": [json_format.MessageToDict(r, preserving_proto_field_name=True,
                                                   always_print_fields_with_no_presence=True)
                         for r in resp.rows]}
