"""Identity headers: signing, verification, tampering, expiry, scope matching."""

from __future__ import annotations

import pytest

from fmapi_common import identity as ident
from fmapi_common.identity import Identity, may_query, parse_key, sign, sign_identity, verify

KEY = b"k" * 32
NOW = 1_732_500_000.0

ALICE = Identity(
    principal="alice@example.com",
    workspace="ws1",
    token_id="abc123",
    scopes=("chat-*", "embed"),
    admin=False,
    principal_kind="user",
)


def signed(identity: Identity = ALICE, key: bytes = KEY, now: float = NOW) -> dict[str, str]:
    return sign_identity(identity, key, now)


def test_round_trip():
    headers = signed()
    assert set(headers) == set(ident.ALL_HEADERS)
    assert headers[ident.SCOPES] == '["chat-*","embed"]'
    assert headers[ident.ADMIN] == "false"
    assert headers[ident.SIGNATURE].startswith("v1=")
    assert verify(headers, KEY, NOW + 1) == ALICE


def test_verify_ignores_unrelated_headers_and_case():
    headers = {k.upper(): v for k, v in signed().items()}
    headers["content-type"] = "application/json"
    headers["x-fmapi-something-else"] = "x"
    assert verify(headers, KEY, NOW) == ALICE


def test_verify_accepts_pairs_like_grpc_metadata():
    pairs = list(signed().items()) + [("user-agent", "grpc-python")]
    assert verify(pairs, KEY, NOW) == ALICE


@pytest.mark.parametrize("name", ident.SIGNED_HEADERS + (ident.TIMESTAMP,))
def test_tampering_with_any_signed_header_fails(name):
    headers = signed()
    headers[name] = headers[name] + "x" if name != ident.TIMESTAMP else str(NOW + 1)
    assert verify(headers, KEY, NOW) is None


def test_escalation_to_admin_or_wider_scopes_fails():
    headers = signed()
    assert verify({**headers, ident.ADMIN: "true"}, KEY, NOW) is None
    assert verify({**headers, ident.SCOPES: '["*"]'}, KEY, NOW) is None
    assert verify({**headers, ident.PRINCIPAL: "root"}, KEY, NOW) is None


def test_tampered_signature_fails():
    headers = signed()
    sig = headers[ident.SIGNATURE]
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    assert verify({**headers, ident.SIGNATURE: flipped}, KEY, NOW) is None
    assert verify({**headers, ident.SIGNATURE: ""}, KEY, NOW) is None


def test_wrong_key_fails_and_rotation_list_works():
    headers = signed(key=KEY)
    other = b"o" * 32
    assert verify(headers, other, NOW) is None
    assert verify(headers, [other, KEY], NOW) == ALICE


@pytest.mark.parametrize("name", ident.ALL_HEADERS)
def test_missing_header_fails(name):
    headers = signed()
    del headers[name]
    assert verify(headers, KEY, NOW) is None


def test_duplicated_header_fails():
    pairs = list(signed().items()) + [(ident.PRINCIPAL, "mallory")]
    assert verify(pairs, KEY, NOW) is None


def test_expiry_both_directions():
    headers = signed()
    assert verify(headers, KEY, NOW + 60) == ALICE
    assert verify(headers, KEY, NOW + 60.5) is None
    assert verify(headers, KEY, NOW - 61) is None  # from the future (clock skew beyond max_age)
    assert verify(headers, KEY, NOW + 5, max_age=2) is None
    assert verify({**headers, ident.TIMESTAMP: "nan"}, KEY, NOW) is None
    assert verify({**headers, ident.TIMESTAMP: "soon"}, KEY, NOW) is None


def test_canonical_encoding_is_unambiguous():
    # Moving characters between adjacent fields must change the signature.
    a = Identity(principal="ab", workspace="c", token_id="t")
    b = Identity(principal="a", workspace="bc", token_id="t")
    assert signed(a)[ident.SIGNATURE] != signed(b)[ident.SIGNATURE]
    mixed = {**signed(a), ident.PRINCIPAL: "a", ident.WORKSPACE: "bc"}
    assert verify(mixed, KEY, NOW) is None


def test_sign_rejects_unknown_missing_or_multiline_values():
    base = ALICE.to_headers()
    with pytest.raises(ValueError):
        sign({**base, "x-fmapi-extra": "1"}, KEY, NOW)
    with pytest.raises(ValueError):
        sign({k: v for k, v in base.items() if k != ident.ADMIN}, KEY, NOW)
    with pytest.raises(ValueError):
        sign({**base, ident.PRINCIPAL: "a\r\nx-fmapi-admin: true"}, KEY, NOW)


def test_bad_admin_or_scopes_values_are_refused_even_if_signed():
    headers = sign({**ALICE.to_headers(), ident.ADMIN: "yes"}, KEY, NOW)
    assert verify(headers, KEY, NOW) is None
    headers = sign({**ALICE.to_headers(), ident.SCOPES: '{"a":1}'}, KEY, NOW)
    assert verify(headers, KEY, NOW) is None


@pytest.mark.parametrize(
    ("scopes", "endpoint", "ok"),
    [
        (("*",), "anything", True),
        (("chat-*",), "chat-llama", True),
        (("chat-*",), "embed-gte", False),
        (("chat-?",), "chat-a", True),
        (("chat-?",), "chat-ab", False),
        (("embed",), "embed", True),
        (("embed",), "embed2", False),
        (("Embed",), "embed", False),  # case-sensitive
        (("[ab]-x",), "a-x", True),
        ((), "embed", False),
        (("*",), "", False),
    ],
)
def test_may_query(scopes, endpoint, ok):
    assert may_query(scopes, endpoint) is ok
    assert Identity("p", "w", "t", scopes=scopes).may_query(endpoint) is ok


def test_admin_does_not_imply_query_scope():
    assert not Identity("p", "w", "t", scopes=(), admin=True).may_query("chat")


def test_parse_key():
    assert parse_key("00" * 16) == b"\x00" * 16
    assert parse_key("ab" * 32) == bytes.fromhex("ab" * 32)
    assert parse_key("a-long-raw-passphrase!") == b"a-long-raw-passphrase!"
    with pytest.raises(ValueError):
        parse_key("short")
    with pytest.raises(ValueError):
        parse_key("abcd" * 3)  # hex but only 6 bytes, and too short raw too
