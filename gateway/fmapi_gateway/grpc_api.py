"""The public gRPC API (fmapi.inference.v1): the same use cases as the REST API, checked by the
same code.

Every request is turned into the REST body it stands for and parsed by the REST parsers
(:mod:`.openai_generation`, :mod:`.openai_embeddings`), so both front ends accept the same
values and refuse the rest with the same messages. A refusal names its field the REST way
(``temperature``, ``messages[0].role``); :func:`_public_fields` renames it to the field's path in
the gRPC request (``sampling.temperature``) before the error leaves, so the ``BadRequest`` detail
points at what the gRPC caller actually sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import json
import re
import uuid
from collections.abc import Callable, Mapping

import numpy as np
from google.protobuf.message import Message
from opentelemetry import trace

from fmapi.inference.v1 import inference_pb2 as pb
from fmapi.inference.v1 import inference_pb2_grpc
from fmapi.routing.v1 import routing_pb2
from fmapi_common.errors import FmapiError, InvalidArgument, NotFound
from fmapi_common.identity import Identity
from fmapi_common.router import endpoint_ready

from . import generation
from .backends import Backends
from .callers import require_query, verified
from .embeddings import embed
from .http_common import check_depth, trace_id
from .openai_embeddings import parse_request
from .openai_generation import FINISH, parse_chat, parse_completion
from .quota import CLIENT_CLOSED, UsageTags, status_of
from .serving_endpoints import render_ai_gateway
from .tasks import TASK_NAMES

_SERVICE_PATH = "/" + pb.DESCRIPTOR.services_by_name["InferenceService"].full_name + "/"
_GATEWAY_TIMEOUT = 504

# REST parameter (the head of a param path) -> its path in the gRPC request, per request type.
_SAMPLING = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "seed",
             "presence_penalty", "frequency_penalty", "stop", "logit_bias", "response_format",
             "ignore_eos", "best_of")
_CHAT_FIELDS = {"model": "endpoint", "logprobs": "sampling.logprobs",
                "top_logprobs": "sampling.top_logprobs",
                **{k: f"sampling.{k}" for k in _SAMPLING}}
_COMPLETE_FIELDS = {"model": "endpoint", "top_logprobs": "logprobs",
                    **{k: f"sampling.{k}" for k in _SAMPLING}}
_EMBED_FIELDS = {"model": "endpoint", "input": "texts", "encoding_format": "encoding"}
_MODEL_FIELDS = {"model": "endpoint", "name": "endpoint"}
# Parameters whose values (endpoint names) messages quote too.
_NAMED_BY_VALUE = frozenset({"model", "name"})


def _head(param: str) -> str:
    cut = min((i for i in (param.find("."), param.find("[")) if i >= 0), default=len(param))
    return param[:cut]


def public_field(param: str, fields: Mapping[str, str]) -> str:
    """``param`` (a REST parameter path) as the path of the same field in the gRPC request."""
    head = _head(param)
    return fields.get(head, head) + param[len(head):]


def _rename(exc: FmapiError, fields: Mapping[str, str]) -> None:
    """Name the gRPC request's field in the error (and where the message quotes it)."""
    if not exc.param:
        return
    old = _head(exc.param)
    new = fields.get(old)
    if new is None:
        return
    exc.param = new + exc.param[len(old):]
    if old in _NAMED_BY_VALUE:  # messages quote endpoint names ('model.v2'): only 'model' itself
        exc.message = exc.message.replace(f"'{old}'", f"'{new}'")
    else:  # the parameter, or a path under it ('response_format.json_schema.schema')
        exc.message = re.sub(rf"'{re.escape(old)}(?=['.\[])", f"'{new}", exc.message)


def _public_fields(fields: Mapping[str, str]):
    """Refusals of the decorated RPC name the gRPC request's fields (unary and streaming)."""

    def wrap(fn):
        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def stream(self, request, context):
                try:
                    async for item in fn(self, request, context):
                        yield item
                except FmapiError as exc:
                    _rename(exc, fields)
                    raise
            return stream

        @functools.wraps(fn)
        async def unary(self, request, context):
            try:
                return await fn(self, request, context)
            except FmapiError as exc:
                _rename(exc, fields)
                raise
        return unary

    return wrap


# ---------------------------------------------------------------- gRPC request -> REST body


def _json(text: str, param: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"'{param}' must be JSON text: {exc}", param=param) from None
    except RecursionError:
        raise InvalidArgument(f"'{param}' is nested too deeply", param=param) from None


def _common(request) -> dict:
    """Fields every generation and embedding request shares with its REST body."""
    out = {"model": request.endpoint}
    if request.client_request_id:
        out["client_request_id"] = request.client_request_id
    if request.usage_context:
        out["usage_context"] = dict(request.usage_context)
    return out


def _sampling(s: pb.Sampling, *, chat: bool) -> dict:
    out: dict = {}
    if s.max_tokens:
        out["max_tokens"] = s.max_tokens
    for name in ("temperature", "top_p", "top_k", "seed", "best_of"):
        if s.HasField(name):
            out[name] = getattr(s, name)
    if s.n:
        out["n"] = s.n
    if s.stop:
        out["stop"] = list(s.stop)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(s, name):
            out[name] = getattr(s, name)
    if s.logit_bias:
        out["logit_bias"] = {str(k): v for k, v in s.logit_bias.items()}
    if s.ignore_eos:
        out["ignore_eos"] = True
    if chat:
        if s.logprobs:
            out["logprobs"] = True
        if s.HasField("top_logprobs"):
            out["top_logprobs"] = s.top_logprobs
    if s.HasField("response_format") and s.response_format.type:
        rf = s.response_format
        kind = pb.ResponseFormatType.Name(rf.type).removeprefix("RESPONSE_FORMAT_TYPE_").lower()
        fmt: dict = {"type": kind}
        if rf.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
            js = rf.json_schema
            schema: dict = {"name": js.name}
            if js.schema_json:
                schema["schema"] = _json(js.schema_json, "response_format.json_schema.schema_json")
            if js.description:
                schema["description"] = js.description
            if js.HasField("strict"):
                schema["strict"] = js.strict
            fmt["json_schema"] = schema
        out["response_format"] = fmt
    return out


def _call(c: pb.ToolCall) -> dict:
    return {"id": c.id, "type": c.type or "function",
            "function": {"name": c.function.name, "arguments": c.function.arguments}}


def _message(m: pb.Message) -> dict:
    out: dict = {"role": m.role, "content": m.content}
    if m.HasField("name"):
        out["name"] = m.name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [_call(c) for c in m.tool_calls]
    return out


def _tool(t: pb.Tool, i: int) -> dict:
    fn: dict = {"name": t.function.name}
    if t.function.description:
        fn["description"] = t.function.description
    if t.function.parameters_json:
        fn["parameters"] = _json(t.function.parameters_json, f"tools[{i}].function.parameters_json")
    if t.function.HasField("strict"):
        fn["strict"] = t.function.strict
    return {"type": t.type or "function", "function": fn}


def chat_body(request: pb.ChatRequest) -> dict:
    """The REST chat body a gRPC ChatRequest stands for (always streamed, usage last)."""
    body = {**_common(request), "messages": [_message(m) for m in request.messages],
            "stream": True, "stream_options": {"include_usage": True},
            **_sampling(request.sampling, chat=True)}
    if request.tools:
        body["tools"] = [_tool(t, i) for i, t in enumerate(request.tools)]
    if request.HasField("tool_choice"):
        which = request.tool_choice.WhichOneof("choice")
        if which == "function_name":
            body["tool_choice"] = {"type": "function",
                                   "function": {"name": request.tool_choice.function_name}}
        elif which == "mode":
            body["tool_choice"] = request.tool_choice.mode
    if request.user:
        body["user"] = request.user
    return body


def complete_body(request: pb.CompleteRequest) -> dict:
    """The REST completions body a gRPC CompleteRequest stands for."""
    body = {**_common(request), "prompt": request.prompt, "stream": True,
            "stream_options": {"include_usage": True},
            **_sampling(request.sampling, chat=False)}
    if request.echo:
        body["echo"] = True
    if request.HasField("suffix"):
        body["suffix"] = request.suffix
    if request.HasField("logprobs"):
        body["logprobs"] = request.logprobs
    if request.user:
        body["user"] = request.user
    return body


def embed_body(request: pb.EmbedRequest) -> dict:
    """The REST embeddings body a gRPC EmbedRequest stands for."""
    body = {**_common(request), "input": list(request.texts)}
    if request.dimensions:
        body["dimensions"] = request.dimensions
    if request.HasField("instruction"):
        body["instruction"] = request.instruction
    if request.encoding == pb.EMBEDDING_ENCODING_BYTES:
        body["encoding_format"] = "base64"  # the same bytes, without the base64
    return body


# ---------------------------------------------------------------- responses


def _logprobs(deltas) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(
        token=t.token, logprob=t.logprob, token_bytes=t.token.encode(),
        top_logprobs=[pb.TopLogprob(token=a.token, logprob=a.logprob, token_bytes=a.token.encode())
                      for a in t.top_logprobs])
        for t in deltas]


def _tool_calls(text: str) -> list[pb.ToolCall]:
    if not text:
        return []
    return [pb.ToolCall(index=i, id=c.get("id", ""), type=c.get("type", "function"),
                        function=pb.FunctionCall(name=c["function"]["name"],
                                                 arguments=c["function"]["arguments"]))
            for i, c in enumerate(json.loads(text))]


_MODES = {routing_pb2.CAPACITY_MODE_PAY_PER_TOKEN: pb.CAPACITY_MODE_PAY_PER_TOKEN,
          routing_pb2.CAPACITY_MODE_PROVISIONED_THROUGHPUT: pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT}
_UPDATES = {
    routing_pb2.CONFIG_UPDATE_STATE_NOT_UPDATING: pb.CONFIG_UPDATE_NOT_UPDATING,
    routing_pb2.CONFIG_UPDATE_STATE_IN_PROGRESS: pb.CONFIG_UPDATE_IN_PROGRESS,
    routing_pb2.CONFIG_UPDATE_STATE_UPDATE_FAILED: pb.CONFIG_UPDATE_UPDATE_FAILED,
}


def describe(ep: routing_pb2.Endpoint, live: set[str], caller: Identity) -> pb.Model:
    """An endpoint as a gRPC caller sees it: its rate limits are the REST ai-gateway's entries,
    less other principals' overrides (an admin sees them all)."""
    limits = [pb.RateLimit(**e) for e in render_ai_gateway(ep)["rate_limits"]
              if caller.admin or e.get("principal", caller.principal) == caller.principal]
    return pb.Model(
        id=ep.name, task=TASK_NAMES.get(ep.task, ""), ready=endpoint_ready(ep, live),
        description=ep.description,
        capacity_mode=_MODES.get(ep.capacity_mode, pb.CAPACITY_MODE_PAY_PER_TOKEN),
        config_update=_UPDATES.get(ep.config_update, pb.CONFIG_UPDATE_NOT_UPDATING),
        rate_limits=limits, default_max_tokens=ep.limits.default_max_tokens,
        max_prompt_tokens=ep.limits.max_prompt_tokens, tags=dict(ep.tags),
    )


# A client whose deadline runs out cancels the call itself (through Envoy), a moment before the
# server's copy of the deadline (counted from when the call arrived) runs out too.
_DEADLINE_SLACK_S = 0.25


def _metadata(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A call's initial metadata: the REST headers' rate-limit numbers and the trace id."""
    return (*headers.items(), ("x-fmapi-trace-id", trace_id(trace.get_current_span())))


def _deadline_passed(context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= _DEADLINE_SLACK_S


def _status(context) -> Callable[[BaseException], int]:
    """What an exception means for this call's caller: its own deadline running out ends the
    call like a timeout (504), not a hang-up (499)."""
    def status(exc: BaseException) -> int:
        return _GATEWAY_TIMEOUT if _deadline_passed(context) else status_of(exc)
    return status


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, backends: Backends, identity_key: bytes) -> None:
        self._backends = backends
        self._key = identity_key

    @staticmethod
    def _tags(context, body: dict, request: Message) -> UsageTags:
        """The call's request id (Envoy's x-request-id: every call comes through Envoy), what the
        caller attached, and the request, for an inference table (made JSON only if kept)."""
        rid = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), "")
        tags = UsageTags.from_body(rid if 0 < len(rid) <= 128 else uuid.uuid4().hex, body)
        return dataclasses.replace(tags, body=request)

    def _caller(self, context, method: str) -> Identity:
        """The identity auth signed for this call of ``method`` (gRPC calls are POSTs)."""
        return verified(context.invocation_metadata() or (), self._key, "POST", _SERVICE_PATH + method)

    @_public_fields(_EMBED_FIELDS)
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        ident = self._caller(context, "Embed")
        body = embed_body(request)
        parsed = parse_request(body, None)
        result = await embed(
            self._backends, ident, parsed["endpoint"], parsed["inputs"],
            self._tags(context, body, request),
            dimensions=parsed["dimensions"], instruction=parsed["instruction"],
            status=_status(context),
        )
        await context.send_initial_metadata(_metadata(result.headers))
        n = result.input_tokens
        if parsed["encoding_format"] == "base64":
            vecs = np.ascontiguousarray(result.vectors, dtype="<f4")
            embeddings = [pb.Embedding(raw=v.tobytes()) for v in vecs]
        else:
            embeddings = [pb.Embedding(values=v) for v in result.vectors.tolist()]
        return pb.EmbedResponse(embeddings=embeddings, usage=pb.Usage(prompt_tokens=n, total_tokens=n),
                                model=result.endpoint)

    @_public_fields(_CHAT_FIELDS)
    async def Chat(self, request: pb.ChatRequest, context):
        body = chat_body(request)
        check_depth(body)
        call = parse_chat(body, None)
        async for resp in self._generate(context, "Chat", body, request, call, pb.ChatResponse):
            yield resp

    @_public_fields(_COMPLETE_FIELDS)
    async def Complete(self, request: pb.CompleteRequest, context):
        body = complete_body(request)
        check_depth(body)
        call = parse_completion(body, None)
        async for resp in self._generate(context, "Complete", body, request, call, pb.CompleteResponse):
            yield resp

    async def _generate(self, context, method: str, body: dict, request, call, cls):
        ident = self._caller(context, method)
        status_of_exc = _status(context)
        run = await generation.start(self._backends, ident, call, self._tags(context, body, request),
                                     status=status_of_exc)
        status = CLIENT_CLOSED
        try:
            await context.send_initial_metadata(_metadata(run.meter.headers if run.meter else {}))
            async for ev in run.events():
                d = ev.delta
                calls = _tool_calls(d.tool_calls_json)
                if not d.text and not d.finish_reason and not calls:
                    continue  # progress of a held-back tool call: nothing to show yet
                yield cls(id=run.id, deltas=[pb.Delta(
                    index=ev.index, text=d.text, finish_reason=FINISH.get(d.finish_reason, ""),
                    tool_calls=calls, logprobs=_logprobs(d.logprobs) if call.logprobs else ())])
            p, c = run.prompt_tokens, run.completion_tokens
            yield cls(id=run.id, usage=pb.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c))
            status = 200
        except BaseException as exc:
            status = status_of_exc(exc)
            raise
        finally:
            run.close(status)

    @_public_fields(_MODEL_FIELDS)
    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        ident = self._caller(context, "ListModels")
        eps, live = await asyncio.gather(self._backends.list_endpoints(), self._backends.live_models())
        return pb.ListModelsResponse(models=[
            describe(e, live, ident) for e in eps
            if not e.retired and (ident.admin or ident.may_query(e.name))
        ])

    @_public_fields(_MODEL_FIELDS)
    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.GetModelResponse:
        ident = self._caller(context, "GetModel")
        if not request.endpoint:
            raise InvalidArgument("'endpoint' is required", param="endpoint")
        if not ident.admin:
            require_query(ident, request.endpoint)
        try:
            ep = await self._backends.get_endpoint(request.endpoint)
        except NotFound as exc:
            raise NotFound(exc.message, param="endpoint", reason=exc.reason) from None
        return pb.GetModelResponse(model=describe(ep, await self._backends.live_models(), ident))
