"""``fmapi.auth.v1.AuthService``: proto <-> token store."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from fmapi.auth.v1 import auth_pb2, auth_pb2_grpc

from .tokens import TokenRecord, TokenStore

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name

_KIND_TO_PROTO = {
    "user": auth_pb2.PRINCIPAL_KIND_USER,
    "service_principal": auth_pb2.PRINCIPAL_KIND_SERVICE_PRINCIPAL,
}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}
_KIND_FROM_PROTO[auth_pb2.PRINCIPAL_KIND_UNSPECIFIED] = "user"


def _ts(t: float | None) -> timestamp_pb2.Timestamp | None:
    if t is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(round(t * 1e9)))
    return ts


def token_info(rec: TokenRecord) -> auth_pb2.TokenInfo:
    info = auth_pb2.TokenInfo(
        id=rec.id,
        name=rec.name,
        owner=auth_pb2.Principal(
            id=rec.principal,
            kind=_KIND_TO_PROTO.get(rec.principal_kind, auth_pb2.PRINCIPAL_KIND_UNSPECIFIED),
            workspace=rec.workspace,
        ),
        scopes=auth_pb2.Scopes(endpoints=list(rec.endpoints), admin=rec.admin),
        create_time=_ts(rec.created),
        prefix=rec.prefix,
    )
    if rec.expires is not None:
        info.expire_time.CopyFrom(_ts(rec.expires))
    if rec.last_used is not None:
        info.last_used_time.CopyFrom(_ts(rec.last_used))
    return info


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """Token management for the gateway (which checks that the caller is an admin)."""

    def __init__(self, store: TokenStore) -> None:
        self._store = store

    async def CreateToken(self, request, context):  # noqa: N802
        secret, rec = await self._store.create(
            name=request.name,
            principal=request.owner.id,
            principal_kind=_KIND_FROM_PROTO.get(request.owner.kind, "user"),
            workspace=request.owner.workspace or "default",
            endpoints=list(request.scopes.endpoints),
            admin=request.scopes.admin,
            lifetime_seconds=request.lifetime_seconds,
        )
        return auth_pb2.CreateTokenResponse(secret=secret, info=token_info(rec))

    async def ListTokens(self, request, context):  # noqa: N802
        records = await self._store.list(owner_id=request.owner_id, workspace=request.workspace)
        return auth_pb2.ListTokensResponse(tokens=[token_info(r) for r in records])

    async def RevokeToken(self, request, context):  # noqa: N802
        await self._store.revoke(request.id)
        return auth_pb2.RevokeTokenResponse()

    async def Authenticate(self, request, context):  # noqa: N802
        rec = await self._store.authenticate(request.secret)
        return auth_pb2.AuthenticateResponse(info=token_info(rec))
