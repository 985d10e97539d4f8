"""Structured-output schemas compiled before they reach the engine, with a time limit.

vLLM compiles a request's output grammar inside the engine process, on one small thread pool,
with no time limit, and a schema can be tiny and still take minutes: with xgrammar 0.2.8,
``{"type": "string", "pattern": "[a-z]{1,20000}"}`` (47 bytes) takes about 40 s, a 1 MB
``const`` about 25 s, an enum of 50k values about 9 s (Gemma 3's 262k-token vocabulary, one
core). A size bound (:func:`~fmapi_generation.validation.check_schema_size`) stops the large
ones before they are even parsed, but not the small slow ones; so every schema is compiled here
first, with the same backend and settings as the engine, and refused when it does not compile
in time, does not compile at all, or admits no output (a grammar that allows no first token,
such as ``{"$ref": "#"}``, makes the engine fail the request after its prefill).

The compiles run in a worker process, one at a time, which is killed and replaced when a compile
runs past the limit: a thread could not be stopped, and would keep a core busy for as long as
the compile takes while the next checks queued behind it. The worker imports xgrammar (and
torch) once, about 4 s, at start-up and after each kill. Verdicts are cached by schema, so a
schema that an application sends with every request is compiled here once; checks of the same
schema at the same time share one compile. Timeouts are not cached (a loaded machine is slower).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from fmapi_common.errors import InvalidArgument, Unavailable

if TYPE_CHECKING:
    from .config import GenerationConfig
    from .engine import Engine

log = logging.getLogger(__name__)

_READY = "ready"
# Worker start-up (spawn, import xgrammar and torch, load the vocabulary) is not compile time.
_START_TIMEOUT_S = 120.0


def tokenizer_info_json(tokenizer: Any, vocab_size: int) -> str:
    """The vocabulary as xgrammar sees it (built exactly as vLLM's xgrammar backend builds it),
    serialized for the worker. CPU work: call it off the event loop."""
    import xgrammar as xgr

    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size).serialize_json()


class GrammarChecker:
    def __init__(
        self,
        tokenizer_info: str,
        *,
        any_whitespace: bool,
        timeout_s: float,
        cache_size: int = 1024,
    ) -> None:
        self._info = tokenizer_info
        self._any_whitespace = any_whitespace
        self.timeout_s = timeout_s
        self._cache_size = cache_size
        # sha256 of the schema -> None (fine) or why it is refused.
        self._verdicts: OrderedDict[str, str | None] = OrderedDict()
        self._pending: dict[str, asyncio.Task] = {}
        self._lock = asyncio.Lock()
        self._worker: _Worker | None = None
        self._starting: asyncio.Task | None = None
        self.compiles = 0  # schemas compiled by the worker (tests, metrics)

    def start(self) -> None:
        """Start the worker now (it takes a few seconds), so the first check does not wait."""
        if self._starting is None:
            self._starting = asyncio.create_task(self._start_worker(), name="grammar-worker")

    async def check(self, schema: dict[str, Any], param: str) -> None:
        """Raise InvalidArgument (naming ``param``) unless ``schema`` compiles in time to a
        grammar that admits some output."""
        text = json.dumps(schema)  # what vLLM compiles (its cache key too)
        key = hashlib.sha256(text.encode()).hexdigest()
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            reason = self._verdicts[key]
        else:
            task = self._pending.get(key)
            if task is None:
                task = asyncio.create_task(self._compile(key, text))
                self._pending[key] = task
                task.add_done_callback(lambda _: self._pending.pop(key, None))
            # Shielded: a caller that goes away does not waste (or break) a compile others wait on.
            reason = await asyncio.shield(task)
        if reason is not None:
            raise InvalidArgument(f"the JSON schema in {param} {reason}", param=param)

    async def _compile(self, key: str, text: str) -> str | None:
        async with self._lock:
            try:
                worker = await self._ready_worker()
            except Exception:
                log.exception("the grammar worker failed to start")
                raise Unavailable(
                    "the output grammar compiler is not available; retry", retry_after=5
                ) from None
            self.compiles += 1
            try:
                reason = await worker.roundtrip(text, self.timeout_s)
            except TimeoutError:
                log.warning("grammar compile ran past %.1fs; replacing the worker", self.timeout_s)
                await self._replace_worker()
                return (
                    f"does not compile to an output grammar within {self.timeout_s:g} s "
                    "(large enums or consts, and long patterns or string lengths, are slow to "
                    "compile): simplify it"
                )
            except (EOFError, OSError):
                log.error("the grammar worker died compiling a schema; replacing it")
                await self._replace_worker()
                reason = "made the grammar compiler fail: simplify it"
        self._verdicts[key] = reason
        if len(self._verdicts) > self._cache_size:
            self._verdicts.popitem(last=False)
        return reason

    async def _ready_worker(self) -> _Worker:
        self.start()
        assert self._starting is not None
        try:
            return await asyncio.shield(self._starting)
        except Exception:
            self._starting = None  # try again on the next check
            raise

    async def _start_worker(self) -> _Worker:
        worker = await asyncio.to_thread(_Worker, self._info, self._any_whitespace)
        try:
            await worker.ready(_START_TIMEOUT_S)
        except BaseException:
            await asyncio.to_thread(worker.kill)
            raise
        self._worker = worker
        return worker

    async def _replace_worker(self) -> None:
        old, self._worker, self._starting = self._worker, None, None
        if old is not None:
            await asyncio.to_thread(old.kill)
        self.start()

    async def close(self) -> None:
        for task in list(self._pending.values()):
            task.cancel()
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        worker, self._worker = self._worker, None
        if worker is not None:
            await asyncio.to_thread(worker.kill)


class _Worker:
    """One compile process and its pipe. Created in a thread: spawning pickles the vocabulary."""

    def __init__(self, tokenizer_info: str, any_whitespace: bool) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve,
            args=(child, tokenizer_info, any_whitespace),
            name="fmapi-grammar",
            daemon=True,
        )
        self.proc.start()
        child.close()

    async def _recv(self, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        fd = self.conn.fileno()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        try:
            async with asyncio.timeout(timeout):
                await readable
        finally:
            loop.remove_reader(fd)
        return self.conn.recv()  # EOFError when the worker died

    async def ready(self, timeout: float) -> None:
        msg = await self._recv(timeout)
        if msg != _READY:
            raise RuntimeError(f"grammar worker failed to start: {msg}")

    async def roundtrip(self, text: str, timeout: float) -> str | None:
        self.conn.send(text)
        return await self._recv(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


# ---------------------------------------------------------------- the worker process


def _serve(conn: Any, tokenizer_info: str, any_whitespace: bool) -> None:
    """Compile schemas sent over ``conn``; answer None (fine) or why the schema is refused."""
    try:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.deserialize_json(tokenizer_info)
        # One thread, no cache: the time measured is the most the engine can spend on it.
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        conn.send(f"{type(exc).__name__}: {exc}")
        return
    # As vLLM's xgrammar backend does for disable_any_whitespace.
    separators = None if any_whitespace else (",", ":")
    conn.send(_READY)
    while True:
        try:
            text = conn.recv()
        except (EOFError, OSError):
            return
        try:
            compiled = compiler.compile_json_schema(
                text, any_whitespace=any_whitespace, separators=separators
            )
            matcher = xgr.GrammarMatcher(compiled)
            matcher.fill_next_token_bitmask(bitmask, 0)
        except Exception as exc:  # noqa: BLE001 - the schema's fault: the verdict
            conn.send(f"cannot be compiled to an output grammar: {exc}")
            continue
        if not _any_allowed(bitmask[0].tolist(), info.vocab_size):
            conn.send(
                "admits no JSON value (for example a $ref that only refers to itself): "
                "nothing could be generated"
            )
            continue
        conn.send(None)


def _any_allowed(words: list[int], vocab_size: int) -> bool:
    """Whether a token bitmask (32 tokens per int32 word) allows any token of the vocabulary."""
    full, rest = divmod(vocab_size, 32)
    if any(words[:full]):
        return True
    return bool(rest and words[full] & ((1 << rest) - 1))


async def grammar_checker(config: GenerationConfig, engine: Engine) -> GrammarChecker | None:
    """The checker for a loaded engine (its worker starting), or None when the structured-output
    backend is not xgrammar (then only the schema size bound applies)."""
    if config.structured_outputs_backend != "xgrammar":
        return None
    info = await asyncio.to_thread(tokenizer_info_json, engine.tokenizer, engine.vocab_size)
    checker = GrammarChecker(
        info,
        any_whitespace=not config.compact_json,
        timeout_s=config.grammar_compile_timeout_s,
    )
    checker.start()
    return checker
