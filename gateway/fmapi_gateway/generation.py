"""The chat/completions use case, shared by the REST and the public gRPC API.

:func:`start` resolves the endpoint and opens one generation stream per prompt with the
request's admission attached: the model server counts the request exactly (prompt tokens, output
to reserve) and has the quota service admit it before its engine runs it. (A call with several
prompts is counted first, CountTokens, and admitted here.) Each stream's first message is read
before returning, so that every refusal (unknown endpoint, bad parameter, prompt too long, rate
limit, no replica) is raised before a response starts. After that, :meth:`Run.events` yields
the deltas; :meth:`Run.close` cancels the streams (which aborts the engine requests) and
settles the request with what was really generated.

Timeouts: every wait for a stream's next message (the first included) is bounded by the
gateway's idle timeout, and each stream by the endpoint's overall cap (a gRPC deadline); either
raises ``DeadlineExceeded`` and ends the stream, which aborts its engine request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from fmapi.generation.v1 import generation_pb2 as pb
from fmapi.routing.v1 import routing_pb2
from fmapi_common.errors import DeadlineExceeded, FmapiError
from fmapi_common.identity import Identity

from . import metrics
from .backends import Backends, call_error, open_generation
from .callers import require_query
from .openai_generation import GenerationCall
from .quota import CLIENT_CLOSED, Meter, UsageTags, status_of
from .tasks import check_endpoint_name, require_task


@dataclass
class Event:
    index: int  # choice index across prompts: prompt_index * n + choice index
    delta: pb.ChoiceDelta


class Run:
    def __init__(self, call: GenerationCall, endpoint: str, streams, *, idle: float, cap: float,
                 meter: Meter | None, model: str = "") -> None:
        self.call = call
        self.endpoint = endpoint
        self.model = model  # the served model the endpoint's traffic split chose
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self._streams = streams
        self._firsts: list[pb.GenerateResponse | None] = [None] * len(streams)
        self._idle = idle
        self._cap = cap
        self.meter = meter
        self.prompt_tokens = 0
        self.completion_tokens = 0
        # Tokens seen in deltas so far: what a run cut short is settled with.
        self.generated = 0
        self.finish_reason = ""
        self.output_characters = 0
        # Each choice's text and finish reason, kept only for an inference table.
        self._texts: dict[int, str] | None = {} if meter is not None and meter.capture else None
        self._finishes: dict[int, str] = {}

    def metered(self, meter: Meter) -> None:
        """The run was admitted by its model server: ``meter`` settles it."""
        self.meter = meter
        if meter.capture:
            self._texts = {}

    @property
    def first(self) -> pb.GenerateResponse | None:
        """The first stream's first message (None: it ended before sending one)."""
        return self._firsts[0]

    def cancel(self) -> None:
        """Cancel every stream (their engine requests are aborted); nothing is settled."""
        for s in self._streams:
            s.cancel()

    async def read_firsts(self) -> None:
        """Every stream's first message: a refusal (bad parameter, no replica) surfaces here."""
        self._firsts = list(await asyncio.gather(*(self._read(k) for k in range(len(self._streams)))))

    async def _read(self, k: int) -> pb.GenerateResponse | None:
        """Stream ``k``'s next message (None at its end), within the idle timeout and the cap."""
        try:
            async with asyncio.timeout(self._idle):
                msg = await self._streams[k].read()
        except TimeoutError:
            self._streams[k].cancel()
            raise DeadlineExceeded(
                f"the model server sent nothing for {self._idle:g} s; the request was cancelled"
            ) from None
        except grpc.RpcError as exc:
            raise call_error(
                exc, f"the request ran past the {self._cap:g} s limit of endpoint '{self.endpoint}'"
            ) from None
        return None if msg is grpc.aio.EOF else msg

    def _absorb(self, k: int, msg: pb.GenerateResponse) -> list[Event]:
        if msg.HasField("usage"):
            self.prompt_tokens += msg.usage.prompt_tokens
            self.completion_tokens += msg.usage.completion_tokens
        for d in msg.choices:
            self.generated += d.num_tokens
            self.output_characters += len(d.text)
            index = k * self.call.n + d.index
            if self._texts is not None:
                self._texts[index] = self._texts.get(index, "") + d.text
            if d.finish_reason:
                self.finish_reason = pb.FinishReason.Name(d.finish_reason).removeprefix("FINISH_REASON_").lower()
                self._finishes[index] = self.finish_reason
        if msg.choices and self.meter is not None:
            self.meter.first_token()
        return [Event(k * self.call.n + d.index, d) for d in msg.choices]

    async def _one(self, k: int) -> AsyncIterator[list[Event]]:
        first = self._firsts[k]
        if first is None:  # the stream ended before its first message
            return
        yield self._absorb(k, first)
        while (msg := await self._read(k)) is not None:
            yield self._absorb(k, msg)

    async def events(self) -> AsyncIterator[Event]:
        if len(self._streams) == 1:
            async for batch in self._one(0):
                for ev in batch:
                    yield ev
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(k):
            try:
                async for batch in self._one(k):
                    await queue.put(batch)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
                await queue.put(exc)
            finally:
                await queue.put(done)

        tasks = [asyncio.create_task(pump(k)) for k in range(len(self._streams))]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    for ev in item:
                        yield ev
        finally:
            for t in tasks:
                t.cancel()

    def close(self, status_code: int = CLIENT_CLOSED) -> None:
        """Cancel what still runs and settle the request (once) with what was generated.
        ``status_code`` is what the caller got (499: it went away before the end)."""
        for s in self._streams:
            s.cancel()
        if self.meter is not None:
            finish = self.finish_reason if status_code == 200 else (
                "cancelled" if status_code == CLIENT_CLOSED else "error")
            self.meter.settle(output_tokens=max(self.completion_tokens, self.generated),
                              status_code=status_code, finish_reason=finish,
                              output_characters=self.output_characters, response=self._aggregate)

    def _aggregate(self) -> dict:
        """The whole response as one object (a streamed one aggregated): the inference table's
        copy."""
        texts = self._texts or {}
        if self.call.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "finish_reason": self._finishes.get(i)} for i in sorted(texts)]
        else:
            choices = [{"index": i, "text": texts[i], "finish_reason": self._finishes.get(i)}
                       for i in sorted(texts)]
        return {"id": self.id, "object": "chat.completion" if self.call.chat else "text_completion",
                "model": self.endpoint, "choices": choices,
                "usage": {"prompt_tokens": self.prompt_tokens,
                          "completion_tokens": self.completion_tokens}}


def _characters(req: pb.GenerateRequest) -> int:
    """Characters of a request's input (the usage record's input_character_count)."""
    if req.HasField("chat"):
        return sum(len(m.content) for m in req.chat.messages)
    return len(req.prompt)


async def start(backends: Backends, caller: Identity, call: GenerationCall, tags: UsageTags,
                status: Callable[[BaseException], int] = status_of) -> Run:
    """``status`` says what an exception means for the caller (the gRPC API maps its client's
    expired deadline to 504)."""
    quota = backends.quota
    # One prompt (every chat, most completions): the model server it runs on counts it and
    # admits it (the admission travels with the request), saving a CountTokens call. Several
    # prompts are counted together and admitted here, as one request.
    attached = quota is not None and len(call.requests) == 1
    try:
        res = await _resolve(backends, caller, call, tags)
        meter = None
        if quota is not None and not attached:
            res, meter = await _count_and_admit(backends, caller, call, tags, res)
        elif attached:
            call.requests[0].admission.CopyFrom(quota.admission(
                tags=tags, endpoint=res.endpoint, model=res.model, caller=caller,
                input_tokens=0, output_tokens=0, streaming=call.stream,
                input_characters=_characters(call.requests[0]),
                sampling=call.requests[0].sampling))
    except BaseException as exc:
        metrics.finished(backends.endpoint_label(call.endpoint), status(exc),
                         caller.principal_kind)
        raise
    if not attached:
        return await _open(backends, res, call, meter, status)
    started = time.monotonic()
    admission = call.requests[0].admission

    def on(chosen):
        admission.served_model = chosen.model  # a second try's split may pick another model
        return _open(backends, chosen, call, None, status)

    try:
        res, run = await backends.on_live_replica(call.endpoint, res, on)
    except BaseException as exc:
        if isinstance(exc, FmapiError) and exc.param == "input":  # the quota service's word
            exc.param = "messages" if call.chat else "prompt"
        code = status(exc)
        metrics.finished(res.endpoint.name, code, caller.principal_kind)
        if code >= 500 or code == CLIENT_CLOSED:
            # It may have been admitted (the model server admits before its engine runs it):
            # nothing it charged stays charged. A 4xx was refused or never reached admission.
            quota.close_unknown(admission, code)
        raise
    first = run.first
    if first is None or not first.HasField("admission"):
        # A model server older than admissions (a rolling upgrade) ignored it and started the
        # engine: stop it, count and admit here, and start again.
        run.cancel()
        call.requests[0].ClearField("admission")
        try:
            res, meter = await _count_and_admit(backends, caller, call, tags, res)
        except BaseException as exc:
            metrics.finished(res.endpoint.name, status(exc), caller.principal_kind)
            raise
        return await _open(backends, res, call, meter, status)
    admission.input_tokens = first.admission.input_tokens
    admission.reserved_output_tokens = first.admission.reserved_output_tokens
    run.metered(quota.meter(admission, first.admission.response, started, res.endpoint, tags,
                            caller))
    return run


async def _open(backends: Backends, res, call: GenerationCall, meter: Meter | None,
                status: Callable[[BaseException], int]) -> Run:
    """One stream per prompt on the chosen replica, each read up to its first message."""
    cap = backends.request_cap(res.endpoint)
    streams = [open_generation(backends, res.replica.address, req, cap) for req in call.requests]
    run = Run(call, res.endpoint.name, streams, idle=backends.idle_timeout, cap=cap, meter=meter,
              model=res.model)
    try:
        await run.read_firsts()
    except BaseException as exc:
        run.close(status(exc))
        raise
    return run


async def _resolve(backends: Backends, caller: Identity, call: GenerationCall, tags: UsageTags):
    """Resolve and check: everything the gateway refuses before any model server is called."""
    check_endpoint_name(call.endpoint, "model")
    require_query(caller, call.endpoint)
    res = await backends.resolve(call.endpoint)
    require_task(res.endpoint, routing_pb2.TASK_CHAT, routing_pb2.TASK_COMPLETIONS)
    default_max = res.endpoint.limits.default_max_tokens
    for k, req in enumerate(call.requests):
        if not call.max_tokens_given and default_max > 0:
            req.sampling.max_tokens = default_max
        req.max_prompt_tokens = res.endpoint.limits.max_prompt_tokens
        req.request_id = f"{tags.request_id}-{k}"
    return res


async def _count_and_admit(backends: Backends, caller: Identity, call: GenerationCall,
                           tags: UsageTags, res):
    """Count every prompt on the model server (CountTokens), then admit them as one request."""
    res, counts = await backends.on_live_replica(
        call.endpoint, res,
        lambda chosen: backends.count_generation_tokens(chosen.replica.address, call.requests))
    meter = await backends.quota.admit(
        tags=tags, endpoint=res.endpoint, model=res.model, caller=caller,
        input_tokens=sum(c.prompt_tokens for c in counts),
        output_tokens=sum(c.max_output_tokens for c in counts),
        streaming=call.stream, input_param="messages" if call.chat else "prompt",
        input_characters=sum(_characters(r) for r in call.requests),
        sampling=call.requests[0].sampling,
    )
    return res, meter
