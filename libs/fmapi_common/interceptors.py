"""Server interceptor that maps domain errors to gRPC status in one place."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable

import grpc

from .errors import FmapiError, Internal, to_rpc_status

log = logging.getLogger(__name__)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns :class:`FmapiError` into its rich status, and anything else into INTERNAL.

    ``exclude_methods`` (full names, ``/package.Service/Method``) are left unwrapped: hot paths
    that never raise (they map every error into their response themselves).
    """

    def __init__(self, *, exclude_methods: Iterable[str] = ()) -> None:
        self._excluded = frozenset(exclude_methods)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._excluded:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    result = inner(request, context)
                    return await result if inspect.isawaitable(result) else result
                except Exception as exc:  # noqa: BLE001 - mapped below
                    await _abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                try:
                    stream = inner_stream(request, context)
                    if hasattr(stream, "__aiter__"):
                        async for item in stream:
                            yield item
                    else:
                        for item in stream:
                            yield item
                except Exception as exc:  # noqa: BLE001 - mapped below
                    await _abort(context, exc, method)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, FmapiError):
        await context.abort_with_status(to_rpc_status(exc))
    # An abort from inside the servicer (or a cancelled call) propagates unchanged.
    if isinstance(exc, (grpc.aio.AbortError, grpc.aio.UsageError)):
        raise exc
    log.exception("unhandled error in %s", method, exc_info=exc)
    await context.abort_with_status(to_rpc_status(Internal(f"internal error in {method}")))

