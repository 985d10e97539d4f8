"""Checks on the endpoint a call names, shared by every API: the name's length, and that the
endpoint serves the call's task (with task names as clients know them)."""

from __future__ import annotations

from fmapi.routing.v1 import routing_pb2
from fmapi_common.endpoints import TASK_NAMES
from fmapi_common.errors import InvalidArgument

# Longest endpoint name: fmapi_common.endpoints allows ``^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$``.
MAX_ENDPOINT_NAME = 63
_API = {
    routing_pb2.TASK_CHAT: "/chat/completions",
    routing_pb2.TASK_COMPLETIONS: "/completions",
    routing_pb2.TASK_EMBEDDINGS: "/embeddings",
}


def check_endpoint_name(name: str, param: str) -> None:
    """400 naming ``param`` for a name no endpoint can have, before it travels anywhere (a
    name echoed in every error's gRPC trailers can make them overflow the metadata limit)."""
    if len(name) > MAX_ENDPOINT_NAME:
        raise InvalidArgument(
            f"'{param}' is {len(name)} characters long; endpoint names have at most "
            f"{MAX_ENDPOINT_NAME}",
            param=param,
        )


def require_task(ep: routing_pb2.Endpoint, *tasks: int) -> None:
    if ep.task not in tasks:
        raise InvalidArgument(
            f"endpoint '{ep.name}' serves {TASK_NAMES.get(ep.task, 'an unknown task')}; "
            f"call it through {_API.get(ep.task, 'its own API')}",
            param="model",
            reason="wrong_task",
        )
