"""The token management API refuses bad bodies before calling auth."""

from __future__ import annotations

import pytest

from fmapi_common.errors import InvalidArgument
from fmapi_common.identity import Identity
from fmapi_gateway.tokens_api import TokensApi

ADMIN = Identity("admin", "default", "t1", ("*",), admin=True)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"lifetime_seconds": 10**30}, "lifetime_seconds"),
        ({"lifetime_seconds": -1}, "lifetime_seconds"),
        ({"lifetime_seconds": True}, "lifetime_seconds"),
        ({"endpoints": [1]}, "endpoints"),
        ({"principal_kind": "robot"}, "principal_kind"),
        ({"comment": 5}, "comment"),
    ],
)
async def test_bad_create_bodies(body, param):
    api = TokensApi("127.0.0.1:1", None)  # never reached: validation comes first
    try:
        with pytest.raises(InvalidArgument) as exc:
            await api.create(ADMIN, body)
        assert exc.value.param == param
    finally:
        await api.close()


async def test_delete_needs_a_token_id():
    api = TokensApi("127.0.0.1:1", None)
    try:
        with pytest.raises(InvalidArgument):
            await api.delete({})
    finally:
        await api.close()


@pytest.mark.parametrize("tid", ["a" * 4096, "../etc", "ABC", 7])
async def test_delete_refuses_what_cannot_be_a_token_id(tid):
    api = TokensApi("127.0.0.1:1", None)  # never reached: validation comes first
    try:
        with pytest.raises(InvalidArgument) as exc:
            await api.delete({"token_id": tid})
        assert exc.value.param == "token_id" and len(exc.value.message) < 200
    finally:
        await api.close()
