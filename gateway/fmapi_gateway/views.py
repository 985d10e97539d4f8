"""How endpoints look to OpenAI clients (Databricks' serving endpoints: :mod:`.serving_endpoints`)."""

from __future__ import annotations

import time

from fmapi.routing.v1 import routing_pb2

from .tasks import TASK_NAMES

# Endpoints declared before the registry kept creation times show this process's start.
_STARTED = int(time.time())


def openai_model(ep: routing_pb2.Endpoint) -> dict:
    return {
        "id": ep.name,
        "object": "model",
        "created": ep.create_time_ms // 1000 or _STARTED,
        "owned_by": "fmapi",
        "task": TASK_NAMES.get(ep.task, ""),
    }
