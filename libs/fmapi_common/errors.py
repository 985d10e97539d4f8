"""The one error model of fmapi, and its mappings at each boundary.

Domain code raises :class:`FmapiError` subclasses. The gRPC boundary turns them into a
``google.rpc.Status`` with ``ErrorInfo`` (reason, param), ``BadRequest`` and ``RetryInfo``
details; the HTTP boundary turns a gRPC status (or a domain error) into an HTTP status with both
the OpenAI body ``{"error": {...}}`` and Databricks' ``error_code``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "fmapi"
# The reason of an UNAVAILABLE that came from the transport (no status details): the server is
# gone or cannot be reached, as opposed to a live server refusing for now.
UNREACHABLE = "upstream_unreachable"
# Longest message carried in a gRPC status: messages may quote what a caller sent, and gRPC
# trailers are limited (an oversized one turns into a transport error).
MAX_MESSAGE_CHARS = 1024


def _clip(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 15] + "… (truncated)"


class FmapiError(Exception):
    """A failure the caller should hear about, with a message that names the problem."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        reason: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if reason:
            self.reason = reason
        self.retry_after = retry_after


class InvalidArgument(FmapiError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_parameter_value"


class NotFound(FmapiError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    reason = "not_found"


class Unauthenticated(FmapiError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    reason = "invalid_api_key"


class PermissionDenied(FmapiError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    reason = "permission_denied"


class AlreadyExists(FmapiError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    reason = "already_exists"


class Conflict(FmapiError):
    """The thing changed under the caller, or another change of it is still in progress."""

    grpc_code = grpc.StatusCode.ABORTED
    reason = "conflict"


class ResourceExhausted(FmapiError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "rate_limit_exceeded"


class FailedPrecondition(FmapiError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "failed_precondition"


class Unavailable(FmapiError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    reason = "temporarily_unavailable"


class DeadlineExceeded(FmapiError):
    """A backend did not answer in time (idle between messages, or the request's overall cap)."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "timeout"


class PayloadTooLarge(FmapiError):
    """Only raised at the HTTP boundary (gRPC has its own message size limit)."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "payload_too_large"


class Internal(FmapiError):
    grpc_code = grpc.StatusCode.INTERNAL
    reason = "internal_error"


_BY_GRPC_CODE: dict[grpc.StatusCode, type[FmapiError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        Unauthenticated,
        PermissionDenied,
        AlreadyExists,
        Conflict,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


# ---------------------------------------------------------------- domain -> gRPC


def retry_after(err: FmapiError) -> float | None:
    """Seconds a caller should wait before trying again: the error's own, else 1 s for an
    unavailable backend (for HTTP's Retry-After and gRPC's RetryInfo alike)."""
    if err.retry_after is not None:
        return err.retry_after
    return 1.0 if isinstance(err, Unavailable) else None


def stable_code(err: FmapiError) -> str:
    """The stable, upper-case code of an error (Databricks' ``error_code``, e.g.
    REQUEST_LIMIT_EXCEEDED): gRPC's ErrorInfo.reason."""
    return next((v[2] for cls, v in _HTTP.items() if isinstance(err, cls)), _HTTP[Internal][2])


def rich_status(err: FmapiError) -> status_pb2.Status:
    """The ``google.rpc.Status`` of an error: ErrorInfo (reason the stable code; metadata
    ``code``, the fine-grained OpenAI code, and ``param``), BadRequest naming the field, and
    RetryInfo when the caller should retry later."""
    info = error_details_pb2.ErrorInfo(reason=stable_code(err), domain=DOMAIN)
    info.metadata["code"] = err.reason
    details: list = [info]
    if err.param:
        info.metadata["param"] = _clip(err.param)
        br = error_details_pb2.BadRequest()
        br.field_violations.add(field=_clip(err.param), description=_clip(err.message))
        details.append(br)
    wait = retry_after(err)
    if wait is not None and err.grpc_code in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              grpc.StatusCode.UNAVAILABLE):
        details.append(error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=int(wait), nanos=int((wait % 1) * 1e9))))
    status = status_pb2.Status(code=err.grpc_code.value[0], message=_clip(err.message))
    for d in details:
        status.details.add().Pack(d)
    return status


def to_rpc_status(err: FmapiError) -> grpc.Status:
    """Build the rich gRPC status for a domain error."""
    from grpc_status import rpc_status

    return rpc_status.to_status(rich_status(err))


# ---------------------------------------------------------------- gRPC -> domain


_STATUS_CODES = {c.value[0]: c for c in grpc.StatusCode}


def from_rpc_error(exc: grpc.RpcError) -> FmapiError:
    """Rebuild the domain error carried by a failed call (details included)."""
    return from_status(rpc_error_status(exc))


def from_status(status: status_pb2.Status) -> FmapiError:
    """Rebuild the domain error of a ``google.rpc.Status`` carried in a message (one item's
    refusal in a call that answers many), as :func:`from_rpc_error` does for a failed call."""
    code = _STATUS_CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    return _rebuild(code, status.message or str(code), status)


def rpc_error_status(exc: grpc.RpcError) -> status_pb2.Status:
    """The ``google.rpc.Status`` of a failed call: its rich status, or its bare code and
    message when it carries none (a transport failure)."""
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(exc)
    except Exception:  # malformed trailers: keep code and message
        status = None
    if status is not None:
        return status
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    return status_pb2.Status(code=code.value[0], message=(
        exc.details() if hasattr(exc, "details") else None) or str(code))


def _rebuild(code: grpc.StatusCode, message: str, status: status_pb2.Status) -> FmapiError:
    param = reason = None
    retry_after = None
    for any_ in status.details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
            reason = info.metadata.get("code") or info.reason or None
            param = info.metadata.get("param") or None
        elif any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            any_.Unpack(ri)
            retry_after = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and reason is None:
        # No status details: the transport failed (the server is gone or unreachable), not the
        # server's own refusal.
        cls: type[FmapiError] = Unavailable
        message = f"upstream service unavailable: {message}"
        reason = UNREACHABLE
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason is None:
        # From the transport (a message or its trailers over a size limit), not a rate limit.
        cls = Internal
        message = f"an internal message was too large: {message}"
    else:
        cls = _BY_GRPC_CODE.get(code, Internal)
    return cls(message, param=param, reason=reason, retry_after=retry_after)


# ---------------------------------------------------------------- domain -> HTTP


@dataclass(frozen=True)
class HttpError:
    status: int
    body: dict
    headers: dict[str, str]


_HTTP: dict[type[FmapiError], tuple[int, str, str]] = {
    # class: (http status, OpenAI error type, Databricks error_code)
    InvalidArgument: (400, "invalid_request_error", "INVALID_PARAMETER_VALUE"),
    NotFound: (404, "invalid_request_error", "RESOURCE_DOES_NOT_EXIST"),
    Unauthenticated: (401, "authentication_error", "UNAUTHENTICATED"),
    PermissionDenied: (403, "permission_error", "PERMISSION_DENIED"),
    AlreadyExists: (409, "invalid_request_error", "RESOURCE_ALREADY_EXISTS"),
    Conflict: (409, "invalid_request_error", "RESOURCE_CONFLICT"),
    ResourceExhausted: (429, "rate_limit_error", "REQUEST_LIMIT_EXCEEDED"),
    FailedPrecondition: (400, "invalid_request_error", "INVALID_STATE"),
    PayloadTooLarge: (413, "invalid_request_error", "INVALID_PARAMETER_VALUE"),
    Unavailable: (503, "server_error", "TEMPORARILY_UNAVAILABLE"),
    DeadlineExceeded: (504, "timeout", "DEADLINE_EXCEEDED"),
    Internal: (500, "server_error", "INTERNAL_ERROR"),
}


def to_http(err: FmapiError) -> HttpError:
    """HTTP status, body (OpenAI and Databricks shapes at once) and headers for an error."""
    status, etype, db_code = next(
        (v for cls, v in _HTTP.items() if isinstance(err, cls)), _HTTP[Internal]
    )
    body = {
        "error": {
            "message": err.message,
            "type": etype,
            "param": err.param,
            "code": err.reason,
        },
        "error_code": db_code,
        "message": err.message,
    }
    headers: dict[str, str] = {}
    wait = retry_after(err)
    if wait is not None and status in (429, 503):
        headers["retry-after"] = str(max(1, math.ceil(wait)))
        headers["retry-after-ms"] = str(int(wait * 1000))
    return HttpError(status, body, headers)


__all__ = [
    "FmapiError",
    "InvalidArgument",
    "NotFound",
    "Unauthenticated",
    "PermissionDenied",
    "AlreadyExists",
    "Conflict",
    "ResourceExhausted",
    "FailedPrecondition",
    "Unavailable",
    "DeadlineExceeded",
    "PayloadTooLarge",
    "Internal",
    "rich_status",
    "retry_after",
    "stable_code",
    "to_rpc_status",
    "from_rpc_error",
    "to_http",
]
