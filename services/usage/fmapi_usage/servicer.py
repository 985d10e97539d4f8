"""UsageService: proto <-> the SQL queries, nothing else."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from fmapi.usage.v1 import usage_pb2 as pb
from fmapi.usage.v1 import usage_pb2_grpc
from fmapi_common.errors import InvalidArgument, NotFound, Unavailable

from .db import DatabaseUnavailable, UsageDB
from .writer import REGISTRY

GROUPS = ("endpoint", "principal", "token", "day", "served_entity", "status")
MAX_ROWS = 1000


def _time(ts: timestamp_pb2.Timestamp, default: datetime) -> datetime:
    if not ts.seconds and not ts.nanos:
        return default
    return ts.ToDatetime(tzinfo=UTC)


async def _query(fn, *args, **kwargs):
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except DatabaseUnavailable as exc:
        raise Unavailable(f"the usage database is unavailable: {exc}", retry_after=5.0) from None


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    def __init__(self, db: UsageDB, redis) -> None:
        self._db = db
        self._r = redis

    async def QueryUsage(self, request, context):
        bad = [g for g in request.group_by if g not in GROUPS]
        if bad or len(set(request.group_by)) != len(request.group_by):
            raise InvalidArgument(f"group by any of {', '.join(GROUPS)}, each once "
                                  f"(not {', '.join(bad) or 'a repeated one'})", param="by")
        until = _time(request.until, datetime.now(UTC))
        since = _time(request.since, datetime.fromtimestamp(0, UTC))
        if since >= until:
            raise InvalidArgument("'since' must be before 'until'", param="since")
        rows = await _query(self._db.query_usage, since=since, until=until,
                            group_by=list(request.group_by), requester=request.principal or None)
        out = pb.QueryUsageResponse()
        for row in rows:
            g = out.groups.add(requests=row["requests"], input_tokens=row["input_tokens"],
                               output_tokens=row["output_tokens"],
                               input_characters=row["input_characters"],
                               output_characters=row["output_characters"])
            for name in request.group_by:
                g.key[name] = "" if row[name] is None else str(row[name])
        return out

    async def QueryPayloads(self, request, context):
        if not 1 <= request.limit <= MAX_ROWS:
            raise InvalidArgument(f"'limit' must be between 1 and {MAX_ROWS}", param="limit")
        raw = await self._r.hget(REGISTRY, request.endpoint)
        if raw is None:
            raise NotFound(f"endpoint '{request.endpoint}' does not exist", param="name")
        table_cfg = json.loads(raw).get("ai_gateway", {}).get("inference_table", {})
        table = await _query(self._db.ensure_inference_table, request.endpoint,
                             table_cfg.get("table_name_prefix", ""))
        rows = await _query(self._db.query_payloads, table,
                            since=_time(request.since, datetime.fromtimestamp(0, UTC)),
                            limit=request.limit)
        out = pb.QueryPayloadsResponse()
        for r in rows:
            row = out.rows.add(
                request_id=r["request_id"], client_request_id=r["client_request_id"] or "",
                status_code=r["status_code"] or 0, execution_time_ms=r["execution_time_ms"] or 0,
                served_entity=r["served_entity"] or "", requester=r["requester"] or "",
                request_json=r["request"] or "", response_json=r["response"] or "",
                logging_error_codes=r["logging_error_codes"] or "",
                sampling_fraction=r["sampling_fraction"] or 0.0)
            row.request_time.FromDatetime(datetime.fromisoformat(r["request_time"]))
        return out
