"""How endpoints look to clients: OpenAI model objects and Databricks serving-endpoint objects."""

from __future__ import annotations

import time

from fmapi.routing.v1 import routing_pb2

from .tasks import TASK_NAMES

# Models are listed with the time this gateway process started as their creation time.
_STARTED = int(time.time())


def openai_model(ep: routing_pb2.Endpoint) -> dict:
    return {
        "id": ep.name,
        "object": "model",
        "created": _STARTED,
        "owned_by": "fmapi",
        "task": TASK_NAMES.get(ep.task, ""),
    }


def databricks_endpoint(ep: routing_pb2.Endpoint, ready: bool) -> dict:
    served = [
        {
            "name": se.name,
            "entity_name": se.model,
            "foundation_model": {"name": se.model},
        }
        for se in ep.served_entities
    ]
    body = {
        "name": ep.name,
        "id": ep.name,
        "task": TASK_NAMES.get(ep.task, ""),
        "endpoint_type": "FOUNDATION_MODEL_API",
        "description": ep.description,
        "state": {
            "ready": "READY" if ready else "NOT_READY",
            "config_update": "NOT_UPDATING",
        },
        "config": {
            "served_entities": served,
            "traffic_config": {
                "routes": [
                    {"served_model_name": se.name, "traffic_percentage": se.traffic_percentage}
                    for se in ep.served_entities
                ]
            },
        },
        "capacity_mode": routing_pb2.CapacityMode.Name(ep.capacity_mode)
        .removeprefix("CAPACITY_MODE_")
        .lower(),
    }
    if ep.retired:
        body["retired"] = True
        body["replacement"] = ep.replacement
    return body


def endpoint_ready(ep: routing_pb2.Endpoint, live_models: set[str]) -> bool:
    return not ep.retired and any(se.model in live_models for se in ep.served_entities)
