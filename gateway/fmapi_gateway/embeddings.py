"""The embeddings use case, shared by the REST and the public gRPC API.

Resolve the endpoint, hand the embedding server the request with its admission (the server
counts the input tokens with the model's tokenizer and has the quota service admit them before
the model runs), and settle (exactly once, whatever happens)."""

from __future__ import annotations

import time
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
from .quota import CLIENT_CLOSED, UsageTags, status_of
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
        res, req = await _prepare(backends, caller, endpoint_name, inputs, tags,
                                  dimensions=dimensions, instruction=instruction)
    except BaseException as exc:
        metrics.finished(backends.endpoint_label(endpoint_name), status(exc),
                         caller.principal_kind)
        raise
    ep = res.endpoint
    cap = backends.request_cap(ep)
    if backends.quota is None:  # an unmetered gateway (benchmarks)
        resp = await backends.embed(res.replica.address, req, cap)
        return _result(ep.name, res.model, resp, {})
    quota = backends.quota
    started = time.monotonic()

    def on(chosen):
        # A second try's traffic split may pick another served model; the admission travels
        # with the request (the same request id: charged once whichever replica admits it).
        req.model = req.admission.served_model = chosen.model
        return backends.embed(chosen.replica.address, req, cap)

    try:
        res, resp = await backends.on_live_replica(endpoint_name, res, on)
        if not resp.HasField("admission"):
            # An embedding server older than admissions (a rolling upgrade) ignored it and ran
            # the request: admit it now, on its exact count, before anyone sees the result.
            meter = await quota.admit(
                tags=tags, endpoint=ep, model=res.model, caller=caller,
                input_tokens=resp.input_tokens, output_tokens=0, streaming=False,
                input_param="input", input_characters=req.admission.input_characters)
        else:
            req.admission.input_tokens = resp.input_tokens
            meter = quota.meter(req.admission, resp.admission, started, ep, tags, caller)
    except BaseException as exc:
        code = status(exc)
        metrics.finished(ep.name, code, caller.principal_kind)
        if code >= 500 or code == CLIENT_CLOSED:
            # It may have been admitted (the embedding server admits before the model runs):
            # it ran to no one, so nothing it charged stays charged. A 4xx was refused or
            # never reached admission: nothing to close.
            quota.close_unknown(req.admission, code)
        raise
    result = _result(ep.name, res.model, resp, meter.headers)
    meter.settle(output_tokens=0, status_code=200, input_tokens=resp.input_tokens,
                 response=lambda: _logged(result))
    return result


async def _prepare(backends: Backends, caller: Identity, endpoint_name: str,
                   inputs: list[str] | list[list[int]], tags: UsageTags, *,
                   dimensions: int | None, instruction: str | None):
    """Resolve and check everything the gateway can refuse before the embedding server: the
    resolution and the request it gets, with its admission when this gateway meters."""
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
    if backends.quota is not None:
        # The embedding server counts the input tokens and admits: one call fewer than
        # counting here first (docs/architecture.md, "Quota").
        req.admission.CopyFrom(backends.quota.admission(
            tags=tags, endpoint=ep, model=res.model, caller=caller, input_tokens=0,
            output_tokens=0, streaming=False,
            input_characters=sum(len(x) for x in inputs if isinstance(x, str))))
    return res, req


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
