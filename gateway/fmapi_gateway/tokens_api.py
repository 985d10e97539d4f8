"""Token management in the shape Databricks clients know (``/api/2.0/token/*``), over the auth
service's gRPC API. Admin tokens only."""

from __future__ import annotations

import re

import grpc
from google.protobuf import timestamp_pb2

from fmapi.auth.v1 import auth_pb2 as pb
from fmapi.auth.v1 import auth_pb2_grpc
from fmapi_common.channels import make_channel
from fmapi_common.errors import InvalidArgument, from_rpc_error
from fmapi_common.identity import Identity
from fmapi_common.tls import AUTH, TlsFiles

_KINDS = {"user": pb.PRINCIPAL_KIND_USER, "service_principal": pb.PRINCIPAL_KIND_SERVICE_PRINCIPAL}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}
# Token ids are short lowercase hex strings (auth makes them with secrets.token_hex).
_TOKEN_ID = re.compile(r"^[0-9a-f]{1,64}$")
_INT64_MAX = 2**63 - 1


def _ms(ts: timestamp_pb2.Timestamp, unset: int | None = -1) -> int | None:
    if not ts.seconds and not ts.nanos:
        return unset
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def token_info(info: pb.TokenInfo) -> dict:
    return {
        "token_id": info.id,
        "creation_time": _ms(info.create_time),
        "expiry_time": _ms(info.expire_time),
        "last_used_time": _ms(info.last_used_time),
        "comment": info.name,
        "principal": info.owner.id,
        "principal_kind": _KIND_NAMES.get(info.owner.kind, "user"),
        "workspace": info.owner.workspace,
        "endpoints": list(info.scopes.endpoints),
        "admin": info.scopes.admin,
    }


class TokensApi:
    def __init__(self, auth_addr: str, tls: TlsFiles | None) -> None:
        self._channel = make_channel(auth_addr, tls, AUTH)
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request):
        try:
            return await method(request, timeout=10)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def create(self, caller: Identity, body: dict) -> dict:
        def opt(key, kind, default):
            v = body.get(key)
            if v is None:
                return default
            if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
                raise InvalidArgument(f"'{key}' has the wrong type", param=key)
            return v

        # The longest lifetime is auth's rule (one constant, one message): here only the shape.
        lifetime = opt("lifetime_seconds", int, 0)
        if not 0 <= lifetime <= _INT64_MAX:
            raise InvalidArgument(
                "'lifetime_seconds' must be 0 (no expiry) or a positive 64-bit number of seconds",
                param="lifetime_seconds",
            )
        kind = opt("principal_kind", str, caller.principal_kind)
        if kind not in _KINDS:
            raise InvalidArgument("'principal_kind' must be 'user' or 'service_principal'",
                                  param="principal_kind")
        endpoints = opt("endpoints", list, list(caller.scopes))
        if not all(isinstance(e, str) for e in endpoints):
            raise InvalidArgument("'endpoints' must be a list of endpoint names or patterns",
                                  param="endpoints")
        req = pb.CreateTokenRequest(
            name=opt("comment", str, ""),
            owner=pb.Principal(id=opt("principal", str, caller.principal), kind=_KINDS[kind],
                               workspace=opt("workspace", str, caller.workspace)),
            scopes=pb.Scopes(endpoints=endpoints, admin=opt("admin", bool, False)),
            lifetime_seconds=lifetime,
        )
        resp = await self._call(self._stub.CreateToken, req)
        return {"token_value": resp.secret, "token_info": token_info(resp.info)}

    async def list(self, caller: Identity) -> dict:
        resp = await self._call(self._stub.ListTokens, pb.ListTokensRequest())
        return {"token_infos": [token_info(t) for t in resp.tokens]}

    async def delete(self, body: dict) -> dict:
        tid = body.get("token_id")
        if not isinstance(tid, str) or not tid:
            raise InvalidArgument("'token_id' is required", param="token_id")
        if not _TOKEN_ID.match(tid):
            raise InvalidArgument(
                "'token_id' is not a token id (at most 64 hexadecimal digits)", param="token_id"
            )
        await self._call(self._stub.RevokeToken, pb.RevokeTokenRequest(id=tid))
        return {}
