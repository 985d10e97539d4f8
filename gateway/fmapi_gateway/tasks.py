"""Endpoint tasks: names as clients know them, and the check that an endpoint serves a task."""

from __future__ import annotations

from fmapi.routing.v1 import routing_pb2
from fmapi_common.errors import InvalidArgument

TASK_NAMES = {
    routing_pb2.TASK_CHAT: "llm/v1/chat",
    routing_pb2.TASK_COMPLETIONS: "llm/v1/completions",
    routing_pb2.TASK_EMBEDDINGS: "llm/v1/embeddings",
}
_API = {
    routing_pb2.TASK_CHAT: "/chat/completions",
    routing_pb2.TASK_COMPLETIONS: "/completions",
    routing_pb2.TASK_EMBEDDINGS: "/embeddings",
}


def require_task(ep: routing_pb2.Endpoint, *tasks: int) -> None:
    if ep.task not in tasks:
        raise InvalidArgument(
            f"endpoint '{ep.name}' serves {TASK_NAMES.get(ep.task, 'an unknown task')}; "
            f"call it through {_API.get(ep.task, 'its own API')}",
            param="model",
            reason="wrong_task",
        )
