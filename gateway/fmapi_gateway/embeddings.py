"""The embeddings use case, shared by the REST and the public gRPC API.

Resolve the endpoint, count the input tokens with the model server's tokenizer, have the quota
service admit them, embed, and settle (exactly once, whatever happens)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fmapi.embedding.v1 import embedding_pb2
from fmapi.routing.v1 import routing_pb2
from fmapi_common.errors import InvalidArgument
from fmapi_common.identity import Identity

from . import metrics
from .backends import Backends
from .callers import require_query
from .quota import UsageTags, status_of
from .tasks import check_endpoint_name, require_task


@dataclass
class Embeddings:
    endpoint: str
    vectors: np.ndarray  # (n, d) float32
    input_tokens: int
    # OpenAI's rate-limit headers for the response.
    headers: dict[str, str] = field(default_factory=dict)
    # The served model that answered.
    model: str = ""


async def embed(
    backends: Backends,
    caller: Identity,
    endpoint_name: str,
    inputs: list[str] | list[list[int]],
    tags: UsageTags,
    *,
    dimensions: int | None = None,
    instruction: str | None = None,
    status: Callable[[BaseException], int] = status_of,
) -> Embeddings:
    """``status`` says what an exception means for the caller (the gRPC API maps its client's
    expired deadline to 504)."""
    try:
        res, req, meter = await _admit(backends, caller, endpoint_name, inputs, tags,
                                       dimensions=dimensions, instruction=instruction)
    except BaseException as exc:
        metrics.finished(backends.endpoint_label(endpoint_name), status(exc),
                         caller.principal_kind)
        raise
    ep = res.endpoint
    if meter is None:  # an unmetered gateway (benchmarks)
        resp = await backends.embed(res.replica.address, req, backends.request_cap(ep))
        return _result(ep.name, res.model, resp, {})
    try:
        resp = await backends.embed(res.replica.address, req, backends.request_cap(ep))
    except BaseException as exc:
        meter.settle(output_tokens=0, status_code=status(exc))
        raise
    result = _result(ep.name, res.model, resp, meter.headers)
    meter.settle(output_tokens=0, status_code=200, input_tokens=resp.input_tokens,
                 response=lambda: _logged(result))
    return result


async def _admit(backends: Backends, caller: Identity, endpoint_name: str,
                 inputs: list[str] | list[list[int]], tags: UsageTags, *,
                 dimensions: int | None, instruction: str | None):
    """Resolve, check, count and admit: everything that may refuse before anything runs."""
    check_endpoint_name(endpoint_name, "model")
    require_query(caller, endpoint_name)
    res = await backends.resolve(endpoint_name)
    ep = res.endpoint
    require_task(ep, routing_pb2.TASK_EMBEDDINGS)
    settings = ep.embedding
    if dimensions is not None:
        if not settings.supported_dimensions:
            raise InvalidArgument(
                f"endpoint '{ep.name}' does not support the 'dimensions' parameter; "
                "omit it to get the model's full vectors",
                param="dimensions",
            )
        if dimensions not in settings.supported_dimensions:
            raise InvalidArgument(
                f"dimensions must be one of {list(settings.supported_dimensions)} for endpoint "
                f"'{ep.name}'",
                param="dimensions",
            )
    req = embedding_pb2.EmbedRequest(
        model=res.model,
        normalize=settings.normalize,
        instruction=settings.query_instruction if instruction is None else instruction,
        truncate=settings.truncate,
        dimensions=dimensions or 0,
    )
    for item in inputs:
        if isinstance(item, str):
            req.inputs.add(text=item)
        else:
            req.inputs.add(tokens=embedding_pb2.TokenIds(ids=item))
    if backends.quota is None:
        return res, req, None

    def count(chosen):
        req.model = chosen.model  # a second try's traffic split may pick another served model
        return backends.count_embedding_tokens(chosen.replica.address, req)

    res, tokens = await backends.counted(endpoint_name, res, count)
    meter = await backends.quota.admit(
        tags=tags, endpoint=ep, model=res.model, caller=caller, input_tokens=tokens,
        output_tokens=0, streaming=False, input_param="input",
        input_characters=sum(len(x) for x in inputs if isinstance(x, str)),
    )
    return res, req, meter


def _logged(result: Embeddings) -> dict:
    """The response as an inference table keeps it (OpenAI's shape, vectors as lists)."""
    return {"object": "list", "model": result.endpoint,
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                     for i, v in enumerate(result.vectors)],
            "usage": {"prompt_tokens": result.input_tokens, "total_tokens": result.input_tokens}}


def _result(endpoint: str, model: str, resp: embedding_pb2.EmbedResponse,
            headers: dict[str, str]) -> Embeddings:
    vectors = np.array([e.values for e in resp.embeddings], dtype=np.float32)
    return Embeddings(endpoint, vectors, resp.input_tokens, headers, model)
