"""Server interceptors: domain errors to gRPC status in one place, and the one way to wrap a
method handler (:func:`wrap_handler`)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable

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
        handler = await continuation(handler_call_details)
        if handler is None or method in self._excluded:
            return handler

        async def on_error(context, exc: Exception) -> None:
            await _abort(context, exc, method)

        return wrap_handler(handler, on_error=on_error)


Hook = Callable[[grpc.aio.ServicerContext], Awaitable[None]]
ErrorHook = Callable[[grpc.aio.ServicerContext, Exception], Awaitable[None]]


def wrap_handler(handler: grpc.RpcMethodHandler, *, before: Hook | None = None,
                 on_error: ErrorHook | None = None) -> grpc.RpcMethodHandler:
    """The same method, running ``before(context)`` first and handing any exception the
    servicer raises to ``on_error(context, exc)`` (which aborts or re-raises). The one way
    fmapi's interceptors wrap a handler, for each of the four kinds of method."""

    async def guard(context, exc: Exception) -> None:
        if on_error is None:
            raise exc
        await on_error(context, exc)

    async def iterate(result):
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            for item in result:
                yield item

    def single(inner):
        async def call(request, context):
            try:
                if before is not None:
                    await before(context)
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result
            except Exception as exc:  # noqa: BLE001 - handed to on_error
                await guard(context, exc)

        return call

    def streaming(inner):
        if inspect.iscoroutinefunction(inner):  # streams with context.write (health's Watch)
            return single(inner)

        async def call(request, context):
            try:
                if before is not None:
                    await before(context)
                async for item in iterate(inner(request, context)):
                    yield item
            except Exception as exc:  # noqa: BLE001 - handed to on_error
                await guard(context, exc)

        return call

    kinds = (
        ("unary_unary", single, grpc.unary_unary_rpc_method_handler),
        ("unary_stream", streaming, grpc.unary_stream_rpc_method_handler),
        ("stream_unary", single, grpc.stream_unary_rpc_method_handler),
        ("stream_stream", streaming, grpc.stream_stream_rpc_method_handler),
    )
    for attr, wrap, make in kinds:
        inner = getattr(handler, attr)
        if inner:
            return make(wrap(inner), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, FmapiError):
        await context.abort_with_status(to_rpc_status(exc))
    # An abort from inside the servicer (or a cancelled call) propagates unchanged.
    if isinstance(exc, (grpc.aio.AbortError, grpc.aio.UsageError)):
        raise exc
    log.exception("unhandled error in %s", method, exc_info=exc)
    await context.abort_with_status(to_rpc_status(Internal(f"internal error in {method}")))

