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


METHOD, PATH, RID = "POST", "/v1/chat/completions", "req-1"
BIND = ident.Binding(METHOD, PATH, RID)


def signed(identity: Identity = ALICE, key: bytes = KEY, now: float = NOW) -> dict[str, str]:
    """What the gateway receives: the signed identity plus the request's own x-request-id."""
    return {**sign_identity(identity, key, now, BIND), ident.REQUEST_ID: RID}


def check(headers, key, now, *, method=METHOD, path=PATH, **kw):
    return verify(headers, key, now, method=method, path=path, **kw)


def test_round_trip():
    headers = signed()
    assert set(headers) == {*ident.ALL_HEADERS, ident.REQUEST_ID}
    assert headers[ident.SCOPES] == '["chat-*","embed"]'
    assert headers[ident.ADMIN] == "false"
    assert headers[ident.SIGNATURE].startswith("v2=")
    assert check(headers, KEY, NOW + 1) == ALICE


def test_verify_ignores_unrelated_headers_and_case():
    headers = {k.upper(): v for k, v in signed().items()}
    headers["content-type"] = "application/json"
    headers["x-fmapi-something-else"] = "x"
    assert check(headers, KEY, NOW) == ALICE


def test_verify_accepts_pairs_like_grpc_metadata():
    pairs = list(signed().items()) + [("user-agent", "grpc-python")]
    assert check(pairs, KEY, NOW) == ALICE


@pytest.mark.parametrize("name", ident.SIGNED_HEADERS + (ident.TIMESTAMP,))
def test_tampering_with_any_signed_header_fails(name):
    headers = signed()
    headers[name] = headers[name] + "x" if name != ident.TIMESTAMP else str(NOW + 1)
    assert check(headers, KEY, NOW) is None


def test_escalation_to_admin_or_wider_scopes_fails():
    headers = signed()
    assert check({**headers, ident.ADMIN: "true"}, KEY, NOW) is None
    assert check({**headers, ident.SCOPES: '["*"]'}, KEY, NOW) is None
    assert check({**headers, ident.PRINCIPAL: "root"}, KEY, NOW) is None


def test_tampered_signature_fails():
    headers = signed()
    sig = headers[ident.SIGNATURE]
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    assert check({**headers, ident.SIGNATURE: flipped}, KEY, NOW) is None
    assert check({**headers, ident.SIGNATURE: ""}, KEY, NOW) is None


def test_wrong_key_fails_and_rotation_list_works():
    headers = signed(key=KEY)
    other = b"o" * 32
    assert check(headers, other, NOW) is None
    assert check(headers, [other, KEY], NOW) == ALICE


@pytest.mark.parametrize("name", ident.ALL_HEADERS)
def test_missing_header_fails(name):
    headers = signed()
    del headers[name]
    assert check(headers, KEY, NOW) is None


def test_duplicated_header_fails():
    pairs = list(signed().items()) + [(ident.PRINCIPAL, "mallory")]
    assert check(pairs, KEY, NOW) is None


def test_expiry_both_directions():
    headers = signed()
    assert check(headers, KEY, NOW + 5) == ALICE
    assert check(headers, KEY, NOW + 5.5) is None  # a few seconds at most: replay is short-lived
    assert check(headers, KEY, NOW - 6) is None  # from the future (clock skew beyond max_age)
    assert check(headers, KEY, NOW + 1, max_age=0.5) is None
    assert check({**headers, ident.TIMESTAMP: "nan"}, KEY, NOW) is None
    assert check({**headers, ident.TIMESTAMP: "soon"}, KEY, NOW) is None


def test_canonical_encoding_is_unambiguous():
    # Moving characters between adjacent fields must change the signature.
    a = Identity(principal="ab", workspace="c", token_id="t")
    b = Identity(principal="a", workspace="bc", token_id="t")
    assert signed(a)[ident.SIGNATURE] != signed(b)[ident.SIGNATURE]
    mixed = {**signed(a), ident.PRINCIPAL: "a", ident.WORKSPACE: "bc"}
    assert check(mixed, KEY, NOW) is None


def test_sign_rejects_unknown_missing_or_multiline_values():
    base = ALICE.to_headers()
    with pytest.raises(ValueError):
        sign({**base, "x-fmapi-extra": "1"}, KEY, NOW, BIND)
    with pytest.raises(ValueError):
        sign({k: v for k, v in base.items() if k != ident.ADMIN}, KEY, NOW, BIND)
    with pytest.raises(ValueError):
        sign({**base, ident.PRINCIPAL: "a\r\nx-fmapi-admin: true"}, KEY, NOW, BIND)


def test_bad_admin_or_scopes_values_are_refused_even_if_signed():
    headers = sign({**ALICE.to_headers(), ident.ADMIN: "yes"}, KEY, NOW, BIND)
    assert check(headers, KEY, NOW) is None
    headers = sign({**ALICE.to_headers(), ident.SCOPES: '{"a":1}'}, KEY, NOW, BIND)
    assert check(headers, KEY, NOW) is None


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


@pytest.mark.parametrize("method, path, rid", [
    ("POST", "/v1/embeddings", RID),  # another path
    ("GET", PATH, RID),  # another method
    ("POST", PATH, "req-2"),  # another request
    ("POST", PATH, None),  # no request id at all
])
def test_attack_signed_headers_replayed_on_another_request_are_refused(method, path, rid):
    headers = {k: v for k, v in signed().items() if k != ident.REQUEST_ID}
    if rid is not None:
        headers[ident.REQUEST_ID] = rid
    assert check(headers, KEY, NOW, method=method, path=path) is None


def test_the_binding_ignores_the_query_string_and_method_case():
    assert check(signed(), KEY, NOW, method="post", path=PATH + "?a=1") == ALICE
