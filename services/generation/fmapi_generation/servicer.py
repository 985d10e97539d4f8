"""gRPC servicer: proto <-> domain, nothing else."""

from __future__ import annotations

import json
import math

from opentelemetry import trace

from fmapi.generation.v1 import generation_pb2 as pb
from fmapi.generation.v1 import generation_pb2_grpc
from fmapi_common.admission import Admitter, admitting

from .domain import (
    ChoiceStep,
    FinishReason,
    GenerateInput,
    Message,
    ResponseFormat,
    Sampling,
    Step,
)
from .service import GenerationService

_FORMAT = {
    pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED: ResponseFormat.TEXT,
    pb.RESPONSE_FORMAT_TYPE_TEXT: ResponseFormat.TEXT,
    pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: ResponseFormat.JSON_OBJECT,
    pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: ResponseFormat.JSON_SCHEMA,
}
_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def _opt(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def request_from_proto(req: pb.GenerateRequest) -> GenerateInput:
    s = req.sampling
    sampling = Sampling(
        max_tokens=_opt(s, "max_tokens"),
        temperature=_opt(s, "temperature"),
        top_p=_opt(s, "top_p"),
        top_k=_opt(s, "top_k"),
        stop=list(s.stop),
        n=_opt(s, "n"),
        seed=_opt(s, "seed"),
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
        response_format=_FORMAT.get(s.response_format, ResponseFormat.TEXT),
        json_schema=s.json_schema,
        logit_bias=dict(s.logit_bias),
        ignore_eos=s.ignore_eos,
    )
    inp = GenerateInput(
        request_id=req.request_id,
        sampling=sampling,
        echo=req.echo,
        max_prompt_tokens=req.max_prompt_tokens,
        keepalive_s=req.keepalive_ms / 1000,
    )
    which = req.WhichOneof("input")
    if which == "prompt":
        inp.prompt = req.prompt
    elif which == "chat":
        c = req.chat
        inp.messages = [
            Message(
                role=m.role,
                content=m.content,
                name=m.name,
                tool_call_id=m.tool_call_id,
                tool_calls_json=m.tool_calls_json,
            )
            for m in c.messages
        ]
        inp.chat_template = c.chat_template
        inp.tools_json = c.tools_json
        inp.tool_choice = c.tool_choice
    return inp


def _logprob(v: float) -> float:
    # -inf does not survive JSON downstream; clamp like OpenAI does (-9999).
    return v if math.isfinite(v) else -9999.0


def choice_to_proto(c: ChoiceStep) -> pb.ChoiceDelta:
    return pb.ChoiceDelta(
        index=c.index,
        text=c.text,
        logprobs=[
            pb.TokenLogprob(
                token=lp.token,
                logprob=_logprob(lp.logprob),
                top_logprobs=[
                    pb.TopLogprob(token=t.token, logprob=_logprob(t.logprob)) for t in lp.top
                ],
            )
            for lp in c.logprobs
        ],
        finish_reason=_FINISH.get(c.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        if c.finish_reason
        else pb.FINISH_REASON_UNSPECIFIED,
        tool_calls_json=json.dumps(c.tool_calls) if c.tool_calls else "",
        num_tokens=c.num_tokens,
    )


def step_to_proto(step: Step) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(choices=[choice_to_proto(c) for c in step.choices])
    if step.admission is not None:
        answer, input_tokens, reserved = step.admission
        resp.admission.CopyFrom(pb.Admission(response=answer, input_tokens=input_tokens,
                                             reserved_output_tokens=reserved))
    if step.usage is not None:
        resp.usage.prompt_tokens = step.usage.prompt_tokens
        resp.usage.completion_tokens = step.usage.completion_tokens
    return resp


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, service: GenerationService, admitter: Admitter | None = None) -> None:
        self.service = service
        self.admitter = admitter

    async def Generate(self, request, context):
        span = trace.get_current_span()  # the gRPC server span
        span.set_attribute("gen_ai.request.model", self.service.engine.model)
        admit = (admitting(self.admitter, request.admission, "generation")
                 if request.HasField("admission") else None)
        async for step in self.service.generate(request_from_proto(request), admit):
            if step.usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", step.usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", step.usage.completion_tokens)
            yield step_to_proto(step)

    async def CountTokens(self, request, context):
        counts = [await self.service.count_tokens(request_from_proto(r)) for r in request.requests]
        return pb.CountTokensResponse(
            counts=[pb.TokenCount(prompt_tokens=p, max_output_tokens=m) for p, m in counts]
        )

    async def GetModelInfo(self, request, context):
        engine = self.service.engine
        return pb.GetModelInfoResponse(
            model=engine.model,
            max_model_len=engine.max_model_len,
            running_requests=engine.running_requests(),
            supports_auto_tool_choice=self.service.limits.auto_tools,
        )
