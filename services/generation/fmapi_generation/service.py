"""The generation use case: validate, render, tokenize, check the grammar, run on the engine,
read tool calls.

The first step of every stream is empty: the request passed every check and the engine queued
it. Everything that can refuse a request happens before it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from fmapi_common.admission import Admit
from fmapi_common.errors import Internal, InvalidArgument

from . import tools as toolcalls
from .chat import PromptRenderer
from .domain import ChoiceStep, FinishReason, GenerateInput, Step, TokenLogprob, Usage
from .engine import Engine
from .grammar import GrammarChecker
from .jsontext import ControlCharEscaper
from .validation import Limits, Plan, ToolMode, resolve_max_tokens, validate

log = logging.getLogger(__name__)


def _reserved(plan: Plan, max_tokens: int) -> int:
    """The output tokens a request reserves: ``max_tokens`` for each of its choices."""
    return max_tokens * plan.sampling.n


class _Buffered:
    """Output of one choice held back until it ends (tool-call choices)."""

    __slots__ = ("text", "logprobs")

    def __init__(self) -> None:
        self.text = ""
        self.logprobs: list[TokenLogprob] = []


class GenerationService:
    def __init__(
        self,
        engine: Engine,
        limits: Limits,
        chat_template: str | None = None,
        chat_stop: list[str] | None = None,
        grammar: GrammarChecker | None = None,
    ) -> None:
        self.engine = engine
        self.limits = limits
        # Compiles structured-output schemas before the engine does (None: size bound only).
        self.grammar = grammar
        # Stop strings every chat request gets (the template's turn boundary, for base models).
        self.chat_stop = list(chat_stop or [])
        self.renderer = PromptRenderer(engine.tokenizer, chat_template, model=engine.model)
        self.inflight = 0
        # Templates and tokenization run off the event loop, one at a time: a Hugging Face
        # fast tokenizer shared between threads can fail with "Already borrowed".
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt")

    def prepare(self, plan: Plan) -> tuple[list[int], str]:
        """Prompt token ids and prompt text (CPU work: run off the event loop)."""
        if plan.messages is not None:
            text = self.renderer.render_chat(
                plan.messages, plan.template_tools(), plan.chat_template
            )
        else:
            text = plan.prompt or ""
        ids = self.renderer.encode(text)
        if not ids:
            raise InvalidArgument(f"the {plan.input_param} is empty", param=plan.input_param)
        return ids, text

    async def _plan(self, req: GenerateInput) -> tuple[Plan, list[int], str, int]:
        """Validate, render and tokenize: the plan, prompt ids and text, and max_tokens."""
        plan = validate(req, self.limits)
        loop = asyncio.get_running_loop()
        prompt_ids, prompt_text = await loop.run_in_executor(self._prep, self.prepare, plan)
        max_tokens = resolve_max_tokens(
            len(prompt_ids),
            plan.max_tokens,
            self.engine.max_model_len,
            plan.input_param,
            plan.max_prompt_tokens,
        )
        return plan, prompt_ids, prompt_text, max_tokens

    async def count_tokens(self, req: GenerateInput) -> tuple[int, int]:
        """Prompt tokens and the most output tokens ``req`` may generate (all choices), with the
        refusals ``generate`` would give for them; nothing runs."""
        plan, prompt_ids, _, max_tokens = await self._plan(req)
        return len(prompt_ids), _reserved(plan, max_tokens)

    async def generate(self, req: GenerateInput, admit: Admit | None = None) -> AsyncIterator[Step]:
        """The request's steps. With ``admit``, it is admitted on what :meth:`count_tokens`
        would say once every check has passed, and before the engine sees it; the answer comes
        with the first step."""
        plan, prompt_ids, prompt_text, max_tokens = await self._plan(req)
        sampling = replace(plan.sampling, max_tokens=max_tokens)
        if plan.messages is not None and self.chat_stop:
            sampling.stop = sampling.stop + [x for x in self.chat_stop if x not in sampling.stop]
        if sampling.json_schema is not None and self.grammar is not None:
            await self.grammar.check(sampling.json_schema, plan.schema_param or "response_format")
        admission = None
        if admit is not None:
            reserved = _reserved(plan, max_tokens)
            admission = (await admit(len(prompt_ids), reserved), len(prompt_ids), reserved)
        request_id = f"{req.request_id or 'gen'}-{uuid.uuid4().hex[:12]}"
        # Greedy decoding gives n identical choices; vLLM refuses n > 1 with temperature 0, so
        # decode once and copy (usage counts every copy, as if each were generated).
        copies = 1
        if sampling.temperature == 0 and sampling.n > 1:
            copies, sampling.n = sampling.n, 1

        self.inflight += 1
        try:
            buffered = plan.tool_mode in (ToolMode.REQUIRED, ToolMode.NAMED, ToolMode.AUTO)
            held: dict[int, _Buffered] = {}
            json_out = sampling.json_schema is not None or sampling.json_object
            escapers: dict[int, ControlCharEscaper] = {}
            completion_tokens = 0
            accepted = False
            async for choices in self.engine.generate(
                prompt_ids, sampling, request_id, raw=plan.tool_mode == ToolMode.AUTO,
                keepalive=req.keepalive_s,
            ):
                if not accepted:  # the engine's first item: the request is queued
                    accepted = True
                    yield Step([], admission=admission)
                    if plan.echo:
                        n = sampling.n * copies
                        yield Step([ChoiceStep(index=i, text=prompt_text) for i in range(n)])
                    continue
                if choices is None:  # nothing new for a while: still queued or working
                    yield Step([])
                    continue
                if not choices:
                    continue
                if any(c.finish_reason == FinishReason.ERROR for c in choices):
                    raise engine_failure(plan)
                if copies > 1:
                    choices = [replace(c, index=i) for i in range(copies) for c in choices]
                completion_tokens += sum(c.num_tokens for c in choices)
                if json_out:
                    for c in choices:
                        c.text = escapers.setdefault(c.index, ControlCharEscaper()).feed(c.text)
                if not buffered:
                    yield Step(choices)
                    continue
                # Held-back choices still report progress (their token counts, no text): the
                # caller meters exactly and sees the request is alive.
                out = []
                for c in choices:
                    h = held.setdefault(c.index, _Buffered())
                    h.text += c.text
                    h.logprobs += c.logprobs
                    if c.finish_reason is not None:
                        out.append(self._finish_tool_choice(plan, c, held.pop(c.index)))
                    elif c.num_tokens:
                        out.append(ChoiceStep(index=c.index, num_tokens=c.num_tokens))
                if out:
                    yield Step(out)
            yield Step([], usage=Usage(len(prompt_ids), completion_tokens))
        finally:
            self.inflight -= 1

    def _finish_tool_choice(self, plan: Plan, last: ChoiceStep, h: _Buffered) -> ChoiceStep:
        step = ChoiceStep(index=last.index, logprobs=h.logprobs, finish_reason=last.finish_reason,
                          num_tokens=last.num_tokens)
        if plan.tool_mode == ToolMode.AUTO:
            parser = self.engine.tool_parser()
            content, calls = toolcalls.parse_auto(parser, h.text, plan.template_tools() or [])
        else:
            content, calls = None, toolcalls.parse_forced(h.text, plan.tools, plan.tool_name)
            if calls is None:
                # Cut short (max_tokens): no complete call; hand back what was generated.
                content = h.text
        if calls:
            step.tool_calls = calls
            step.finish_reason = FinishReason.TOOL_CALLS
        step.text = content or ""
        return step


def engine_failure(plan: Plan) -> Exception:
    """The error for a request the engine gave up on (finish reason "error")."""
    if plan.schema_param:
        # The schema compiled and admits a first token (checked before), so the grammar reached
        # a dead end later: the schema admits no complete value along the path the model took
        # (e.g. a required property whose $ref only refers back to itself).
        return InvalidArgument(
            f"generation failed: the output grammar of the JSON schema in {plan.schema_param} "
            "reached a dead end (no valid continuation); check that every required property "
            "can be completed",
            param=plan.schema_param,
        )
    return Internal("the model engine failed this request; try again")
