"""The details of a ``google.rpc.Status`` (what fmapi's errors carry), by type name."""

from __future__ import annotations

from google.rpc import error_details_pb2, status_pb2

_KINDS = (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo)


def details(status: status_pb2.Status) -> dict:
    """{"ErrorInfo": ..., "BadRequest": ..., "RetryInfo": ...}, whichever the status holds."""
    out = {}
    for any_ in status.details:
        for cls in _KINDS:
            if any_.Is(cls.DESCRIPTOR):
                msg = cls()
                any_.Unpack(msg)
                out[cls.__name__] = msg
    return out
