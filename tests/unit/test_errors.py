"""The error map: domain error -> gRPC status (with details) -> domain error -> HTTP."""

from __future__ import annotations

import grpc
import pytest

from fmapi_common import errors as e


class FakeCall(grpc.RpcError):
    """What a failed call looks like to the client: code, details and trailing metadata."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self):
        return self._status.code

    def details(self):
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata


@pytest.mark.parametrize(
    "err, http_status, etype, db_code",
    [
        (e.InvalidArgument("bad temperature", param="temperature"), 400, "invalid_request_error", "INVALID_PARAMETER_VALUE"),
        (e.NotFound("no endpoint x", param="model"), 404, "invalid_request_error", "RESOURCE_DOES_NOT_EXIST"),
        (e.Unauthenticated("no token"), 401, "authentication_error", "UNAUTHENTICATED"),
        (e.PermissionDenied("not yours"), 403, "permission_error", "PERMISSION_DENIED"),
        (e.ResourceExhausted("slow down", retry_after=2.5), 429, "rate_limit_error", "REQUEST_LIMIT_EXCEEDED"),
        (e.Unavailable("no replica", retry_after=1), 503, "server_error", "TEMPORARILY_UNAVAILABLE"),
        (e.FailedPrecondition("retired; use y", param="model"), 400, "invalid_request_error", "INVALID_STATE"),
    ],
)
@pytest.mark.parametrize("carrier", ["call", "status", "call's status"])
def test_round_trip_keeps_message_param_and_retry(err, http_status, etype, db_code, carrier):
    """Through a failed call's trailers, or as a ``google.rpc.Status`` in a message (one item
    of a call that answers many), the same error comes back."""
    if carrier == "call":
        back = e.from_rpc_error(FakeCall(e.to_rpc_status(err)))
    elif carrier == "status":
        back = e.from_status(e.rich_status(err))
    else:
        back = e.from_status(e.rpc_error_status(FakeCall(e.to_rpc_status(err))))
    assert type(back) is type(err)
    assert back.message == err.message
    assert back.param == err.param
    assert back.reason == err.reason
    assert back.retry_after == err.retry_after
    http = e.to_http(back)
    assert http.status == http_status
    assert http.body["error"] == {"message": err.message, "type": etype, "param": err.param, "code": err.reason}
    assert http.body["error_code"] == db_code
    if http_status in (429, 503):
        assert int(http.headers["retry-after"]) >= 1
        assert int(http.headers["retry-after-ms"]) == int((err.retry_after or 1) * 1000)
    else:
        assert "retry-after" not in http.headers


def _plain(code: grpc.StatusCode, details: str) -> FakeCall:
    """A failure with no rich details, as a dead or foreign server produces."""
    return FakeCall(type("S", (), {"code": code, "details": details, "trailing_metadata": ()})())


def test_plain_unavailable_from_a_dead_backend_is_503_with_retry_after():
    err = e.from_rpc_error(_plain(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert isinstance(err, e.Unavailable)
    assert "unavailable" in err.message
    http = e.to_http(err)
    assert http.status == 503 and http.headers["retry-after"] == "1"


def test_a_bare_failed_call_keeps_its_code_and_message_as_a_status():
    back = e.from_status(e.rpc_error_status(_plain(grpc.StatusCode.UNAVAILABLE, "refused")))
    assert isinstance(back, e.Unavailable) and back.reason == e.UNREACHABLE
    assert "refused" in back.message


def test_unknown_codes_become_internal():
    assert e.to_http(e.from_rpc_error(_plain(grpc.StatusCode.DATA_LOSS, "x"))).status == 500


def test_long_messages_are_clipped_in_grpc_status():
    """A message quoting a huge input must not overflow gRPC's trailers (a transport error)."""
    from fmapi_common.errors import MAX_MESSAGE_CHARS, InvalidArgument, to_rpc_status

    st = to_rpc_status(InvalidArgument("unknown role '" + "x" * 100_000 + "'", param="messages"))
    assert len(st.details) < 4 * MAX_MESSAGE_CHARS
    assert st.details.endswith("(truncated)")


def test_a_bare_resource_exhausted_is_not_a_rate_limit():
    import grpc

    from fmapi_common.errors import Internal, from_rpc_error

    class Bare(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self):
            return "Stream removed (metadata size exceeds limit)"

        def trailing_metadata(self):
            return ()

    assert isinstance(from_rpc_error(Bare()), Internal)


@pytest.mark.parametrize(
    "err, reason, retry",
    [
        (e.ResourceExhausted("slow down", retry_after=2.5), "REQUEST_LIMIT_EXCEEDED", 2.5),
        (e.Unavailable("no replica"), "TEMPORARILY_UNAVAILABLE", 1.0),  # the default wait
        (e.InvalidArgument("bad", param="sampling.temperature"), "INVALID_PARAMETER_VALUE", None),
        (e.NotFound("no such endpoint", param="endpoint"), "RESOURCE_DOES_NOT_EXIST", None),
    ],
)
def test_rich_status_carries_a_stable_reason_the_field_and_when_to_retry(err, reason, retry):
    from helpers.rich_status import details

    found = details(e.rich_status(err))
    info = found["ErrorInfo"]
    assert (info.reason, info.domain, info.metadata["code"]) == (reason, "fmapi", err.reason)
    if err.param:
        [v] = found["BadRequest"].field_violations
        assert (v.field, v.description) == (err.param, err.message)
    else:
        assert "BadRequest" not in found
    if retry is None:
        assert "RetryInfo" not in found
    else:
        d = found["RetryInfo"].retry_delay
        assert d.seconds + d.nanos / 1e9 == pytest.approx(retry)
