"""The public gRPC API (fmapi.inference.v1): proto <-> the same use cases as the REST API."""

from __future__ import annotations

import asyncio

from fmapi.inference.v1 import inference_pb2 as pb
from fmapi.inference.v1 import inference_pb2_grpc
from fmapi_common.errors import InvalidArgument

from .backends import Backends
from .embeddings import embed
from .tasks import TASK_NAMES
from .views import endpoint_ready


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, backends: Backends) -> None:
        self._backends = backends

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        if not request.endpoint:
            raise InvalidArgument("'endpoint' is required", param="endpoint")
        if not request.texts:
            raise InvalidArgument("'texts' must not be empty", param="texts")
        result = await embed(
            self._backends,
            request.endpoint,
            list(request.texts),
            dimensions=request.dimensions or None,
            instruction=request.instruction if request.HasField("instruction") else None,
        )
        n = result.input_tokens
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=v) for v in result.vectors.tolist()],
            usage=pb.Usage(prompt_tokens=n, total_tokens=n),
            model=result.endpoint,
        )

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        eps, live = await asyncio.gather(
            self._backends.list_endpoints(), self._backends.live_models()
        )
        return pb.ListModelsResponse(
            models=[
                pb.Model(id=e.name, task=TASK_NAMES.get(e.task, ""), ready=endpoint_ready(e, live))
                for e in eps
                if not e.retired
            ]
        )
