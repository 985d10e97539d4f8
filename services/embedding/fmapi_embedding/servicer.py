"""EmbeddingService: proto <-> domain, nothing else."""

from __future__ import annotations

from fmapi.embedding.v1 import embedding_pb2 as pb
from fmapi.embedding.v1 import embedding_pb2_grpc
from fmapi_common.admission import Admitter, admitting

from .service import EmbedOptions, Embedder


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, embedder: Embedder, admitter: Admitter | None = None) -> None:
        self._embedder = embedder
        self._admitter = admitter

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        admit = (admitting(self._admitter, request.admission, "embedding")
                 if request.HasField("admission") else None)
        result = await self._embedder.embed(request.model, *_domain(request), admit)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=row) for row in result.vectors.tolist()],
            input_tokens=result.input_tokens,
            model=request.model,
            admission=result.admission,
        )

    async def CountTokens(self, request: pb.CountTokensRequest, context) -> pb.CountTokensResponse:
        tokens = await self._embedder.count_tokens(request.request.model, *_domain(request.request))
        return pb.CountTokensResponse(input_tokens=tokens)

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=name,
                    dimensions=h.encoder.dimensions,
                    max_input_tokens=h.encoder.max_input_tokens,
                )
                for name, h in self._embedder.models.items()
            ]
        )


def _domain(request: pb.EmbedRequest) -> tuple[list, EmbedOptions]:
    # Token ids stay in their proto container: copying a million ids is work for the lane.
    inputs = [i.text if i.WhichOneof("kind") == "text" else i.tokens.ids for i in request.inputs]
    return inputs, EmbedOptions(
        normalize=request.normalize,
        instruction=request.instruction,
        truncate=request.truncate,
        dimensions=request.dimensions,
    )
