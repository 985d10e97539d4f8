"""Chat/completions responses as the OpenAI SDK reads them: whole objects or SSE chunks.

Streams: every chunk has the same ``id`` and ``created``; the first delta of each choice carries
the role; the last carries ``finish_reason``; with ``include_usage`` every chunk has
``usage: null`` and one extra chunk before ``[DONE]`` has ``choices: []`` and the totals. An error
after the stream started is sent as an ``error`` event, then the stream ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import orjson

from fmapi_common.errors import FmapiError, Internal, to_http

from .generation import Run
from .quota import CLIENT_CLOSED, status_of
from .openai_generation import FINISH, chat_logprobs, completion_logprobs, tool_calls, usage

log = logging.getLogger(__name__)


def _sse(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _choice_count(run: Run) -> int:
    return run.call.n * len(run.call.requests)


async def stream(run: Run) -> AsyncIterator[bytes]:
    chat = run.call.chat
    base = {
        "id": ("chatcmpl-" if chat else "cmpl-") + run.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": run.created,
        "model": run.endpoint,
    }
    with_usage = run.call.include_usage

    def chunk(choices: list[dict]) -> bytes:
        body = {**base, "choices": choices}
        if with_usage:
            body["usage"] = None
        return _sse(body)

    offsets = [0] * _choice_count(run)
    status = CLIENT_CLOSED  # until the stream is seen through to its end
    try:
        if chat:
            yield chunk([
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
                for i in range(_choice_count(run))
            ])
        async for ev in run.events():
            d = ev.delta
            finish = FINISH.get(d.finish_reason)
            # A token whose text is still empty (part of a character) gets its event when the
            # caller asked for logprobs: its entry would be lost otherwise.
            logprobs = run.call.logprobs and bool(d.logprobs)
            if chat:
                delta: dict = {}
                if d.text or logprobs:
                    delta["content"] = d.text
                calls = tool_calls(d, streaming=True)
                if calls:
                    delta["tool_calls"] = calls
                choice = {"index": ev.index, "delta": delta,
                          "logprobs": chat_logprobs(d.logprobs) if logprobs else None,
                          "finish_reason": finish}
            else:
                choice = {"index": ev.index, "text": d.text,
                          "logprobs": completion_logprobs(d.logprobs, offsets[ev.index])
                          if logprobs else None,
                          "finish_reason": finish}
                offsets[ev.index] += len(d.text)
            if d.text or finish or logprobs or choice.get("delta"):
                yield chunk([choice])
        if with_usage:
            yield _sse({**base, "choices": [], "usage": usage(run.prompt_tokens, run.completion_tokens)})
        yield b"data: [DONE]\n\n"
        status = 200
    except FmapiError as exc:
        status = to_http(exc).status
        yield _sse(to_http(exc).body)
    except Exception:  # noqa: BLE001 - reported in-band, the stream is already open
        log.exception("generation stream failed")
        status = 500
        yield _sse(to_http(Internal("generation failed mid-stream")).body)
    finally:
        run.close(status)


async def collect(run: Run) -> dict:
    n = _choice_count(run)
    texts = [""] * n
    finishes: list[str | None] = [None] * n
    lps: list[list] = [[] for _ in range(n)]
    calls: list[list | None] = [None] * n
    status = 200
    try:
        async for ev in run.events():
            d = ev.delta
            texts[ev.index] += d.text
            lps[ev.index].extend(d.logprobs)
            if d.finish_reason:
                finishes[ev.index] = FINISH.get(d.finish_reason)
            c = tool_calls(d, streaming=False)
            if c:
                calls[ev.index] = c
    except BaseException as exc:
        status = status_of(exc)
        raise
    finally:
        run.close(status)
    if run.call.chat:
        choices = []
        for i in range(n):
            message: dict = {"role": "assistant", "content": texts[i] if not calls[i] else (texts[i] or None)}
            if calls[i]:
                message["tool_calls"] = calls[i]
            choices.append({"index": i, "message": message,
                            "logprobs": chat_logprobs(lps[i]) if run.call.logprobs else None,
                            "finish_reason": finishes[i] or "stop"})
        obj = "chat.completion"
        prefix = "chatcmpl-"
    else:
        choices = [{"index": i, "text": texts[i],
                    "logprobs": completion_logprobs(lps[i], 0) if run.call.logprobs else None,
                    "finish_reason": finishes[i] or "stop"} for i in range(n)]
        obj = "text_completion"
        prefix = "cmpl-"
    return {
        "id": prefix + run.id,
        "object": obj,
        "created": run.created,
        "model": run.endpoint,
        "choices": choices,
        "usage": usage(run.prompt_tokens, run.completion_tokens),
    }
