"""The public gRPC API (fmapi.inference.v1): proto <-> the same use cases as the REST API."""

from __future__ import annotations

import asyncio
import uuid

from fmapi.inference.v1 import inference_pb2 as pb
from fmapi.inference.v1 import inference_pb2_grpc
from fmapi.generation.v1 import generation_pb2 as gen_pb
from fmapi_common.errors import InvalidArgument
from fmapi_common.router import endpoint_ready

from . import generation
from .backends import Backends
from .callers import verified
from .embeddings import embed
from .openai_generation import FINISH, GenerationCall
from .quota import UsageTags, status_of
from .tasks import TASK_NAMES, check_endpoint_name


_SERVICE_PATH = "/" + pb.DESCRIPTOR.services_by_name["InferenceService"].full_name + "/"


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, backends: Backends, identity_key: bytes) -> None:
        self._backends = backends
        self._key = identity_key

    @staticmethod
    def _tags(context, request=None) -> UsageTags:
        """The call's request id: Envoy's x-request-id (every call comes through Envoy), and
        the request, for an inference table (turned into JSON only if it is kept)."""
        rid = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), "")
        return UsageTags(rid if 0 < len(rid) <= 128 else uuid.uuid4().hex, body=request)

    def _caller(self, context, method: str):
        """The identity auth signed for this call of ``method`` (gRPC calls are POSTs)."""
        return verified(context.invocation_metadata() or (), self._key, "POST", _SERVICE_PATH + method)

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        if not request.endpoint:
            raise InvalidArgument("'endpoint' is required", param="endpoint")
        check_endpoint_name(request.endpoint, "endpoint")
        if not request.texts:
            raise InvalidArgument("'texts' must not be empty", param="texts")
        result = await embed(
            self._backends,
            self._caller(context, "Embed"),
            request.endpoint,
            list(request.texts),
            self._tags(context, request),
            dimensions=request.dimensions or None,
            instruction=request.instruction if request.HasField("instruction") else None,
        )
        n = result.input_tokens
        await context.send_initial_metadata(tuple(result.headers.items()))
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=v) for v in result.vectors.tolist()],
            usage=pb.Usage(prompt_tokens=n, total_tokens=n),
            model=result.endpoint,
        )

    async def Chat(self, request: pb.ChatRequest, context):
        if not request.messages:
            raise InvalidArgument("'messages' must not be empty", param="messages")
        chat = gen_pb.Chat(
            messages=[gen_pb.ChatMessage(role=m.role, content=m.content) for m in request.messages]
        )
        req = gen_pb.GenerateRequest(chat=chat, sampling=_sampling(request.sampling))
        async for resp in self._generate(context, "Chat", request, req, chat=True, cls=pb.ChatResponse):
            yield resp

    async def Complete(self, request: pb.CompleteRequest, context):
        req = gen_pb.GenerateRequest(prompt=request.prompt, sampling=_sampling(request.sampling))
        async for resp in self._generate(context, "Complete", request, req, chat=False, cls=pb.CompleteResponse):
            yield resp

    async def _generate(self, context, method: str, request, req, *, chat: bool, cls):
        ident = self._caller(context, method)
        endpoint = request.endpoint
        if not endpoint:
            raise InvalidArgument("'endpoint' is required", param="endpoint")
        check_endpoint_name(endpoint, "endpoint")
        s = req.sampling
        call = GenerationCall(
            endpoint=endpoint, requests=[req], stream=True, include_usage=True,
            n=s.n if s.HasField("n") else 1, logprobs=False, chat=chat,
            max_tokens_given=s.HasField("max_tokens"),
        )
        run = await generation.start(self._backends, ident, call, self._tags(context, request))
        status = 200
        try:
            if run.meter is not None:
                await context.send_initial_metadata(tuple(run.meter.headers.items()))
            async for ev in run.events():
                d = ev.delta
                if not d.text and not d.finish_reason:
                    continue  # progress of a held-back tool call: nothing to show yet
                yield cls(id=run.id, deltas=[pb.Delta(index=ev.index, text=d.text,
                                                      finish_reason=FINISH.get(d.finish_reason, ""))])
            p, c = run.prompt_tokens, run.completion_tokens
            yield cls(id=run.id, usage=pb.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c))
        except BaseException as exc:
            status = status_of(exc)
            raise
        finally:
            run.close(status)

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        ident = self._caller(context, "ListModels")
        eps, live = await asyncio.gather(
            self._backends.list_endpoints(), self._backends.live_models()
        )
        return pb.ListModelsResponse(
            models=[
                pb.Model(id=e.name, task=TASK_NAMES.get(e.task, ""), ready=endpoint_ready(e, live))
                for e in eps
                if not e.retired and (ident.admin or ident.may_query(e.name))
            ]
        )


def _sampling(s: pb.Sampling) -> gen_pb.SamplingParams:
    out = gen_pb.SamplingParams(
        stop=list(s.stop), presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty
    )
    if s.max_tokens:
        out.max_tokens = s.max_tokens
    if s.n:
        out.n = s.n
    for name in ("temperature", "top_p", "top_k", "seed"):
        if s.HasField(name):
            setattr(out, name, getattr(s, name))
    return out
