"""Token format, hashing and records (no Redis)."""

from __future__ import annotations

import hashlib
import math
import re

import pytest

from fmapi_auth import tokens
from fmapi_common.errors import InvalidArgument


def test_secret_format_and_entropy():
    s = tokens.generate_secret()
    assert s.startswith("fmapi_")
    assert len(s) == tokens.SECRET_LEN == 6 + 43 + 6
    assert re.fullmatch(r"fmapi_[0-9A-Za-z]{49}", s)
    # 43 base62 characters carry at least 256 bits.
    assert 43 * math.log2(62) >= 256
    assert tokens.is_well_formed(s)


def test_secrets_are_unique_and_use_the_whole_alphabet():
    many = {tokens.generate_secret() for _ in range(2000)}
    assert len(many) == 2000
    chars = set("".join(s[6:49] for s in many))
    assert len(chars) == 62


def test_checksum_rejects_typos_and_truncation():
    s = tokens.generate_secret()
    i = 20
    typo = s[:i] + ("a" if s[i] != "a" else "b") + s[i + 1 :]
    assert not tokens.is_well_formed(typo)
    assert not tokens.is_well_formed(s[:-1])
    assert not tokens.is_well_formed(s + "x")
    assert not tokens.is_well_formed("dapi" + s[4:])
    assert not tokens.is_well_formed("")
    assert not tokens.is_well_formed(s.replace("fmapi_", "fmapi-"))


def test_hash_is_sha256_and_does_not_contain_the_secret():
    s = tokens.generate_secret()
    h = tokens.hash_secret(s)
    assert h == hashlib.sha256(s.encode()).hexdigest()
    assert s not in h and s[6:] not in h
    assert tokens.hash_secret(tokens.generate_secret()) != h


def test_display_prefix_is_short():
    s = tokens.generate_secret()
    p = tokens.display_prefix(s)
    assert p == s[:10] and p.startswith("fmapi_")


def test_b62_round_numbers():
    assert tokens._b62(0, 3) == "000"
    assert tokens._b62(61, 2) == "0z"
    assert tokens._b62(62, 2) == "10"
    with pytest.raises(ValueError):
        tokens._b62(62**2, 2)


def _rec(**kw):
    base = dict(
        id="t1",
        name="n",
        principal="alice",
        principal_kind="user",
        workspace="default",
        endpoints=("chat-*",),
        admin=False,
        created=100.0,
        expires=None,
        last_used=None,
        prefix="fmapi_abcd",
        sha256="00" * 32,
    )
    base.update(kw)
    return tokens.TokenRecord(**base)


def test_record_round_trip_and_expiry():
    r = _rec(expires=200.5, last_used=150.25, admin=True)
    assert tokens.TokenRecord.from_hash(r.to_hash()) == r
    assert tokens.TokenRecord.from_hash(_rec().to_hash()) == _rec()
    assert not r.expired(200.4)
    assert r.expired(200.5)
    assert not _rec().expired(1e12)
    idt = r.identity()
    assert (idt.principal, idt.token_id, idt.scopes) == ("alice", "t1", ("chat-*",))
    assert idt.admin


@pytest.mark.parametrize(
    "kw",
    [
        {"principal": ""},
        {"principal": "bad name"},
        {"principal": "ü"},
        {"workspace": "a/b"},
        {"principal_kind": "robot"},
        {"endpoints": ("ok", "bad scope")},
        {"endpoints": ("x",) * 101},
        {"lifetime_seconds": -1},
        {"name": "a\nb"},
        {"name": "x" * 300},
    ],
)
def test_validation(kw):
    args = dict(
        name="n",
        principal="alice",
        principal_kind="user",
        workspace="default",
        endpoints=("chat-*",),
        lifetime_seconds=0,
    )
    args.update(kw)
    with pytest.raises(InvalidArgument):
        tokens.validate_new_token(**args)


def test_validation_accepts_typical_values():
    tokens.validate_new_token(
        name="ci token",
        principal="svc-ci@example.com",
        principal_kind="service_principal",
        workspace="prod-eu",
        endpoints=("*", "chat-[ab]?", "gte_large"),
        lifetime_seconds=3600,
    )
