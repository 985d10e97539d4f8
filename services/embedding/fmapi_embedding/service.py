"""Embedding domain logic: validation, instruction, truncation, batching, normalization.

No gRPC here: the servicer converts protos to these calls. Nothing CPU-heavy runs on the event
loop: inputs are decoded, tokenized and truncated on a tokenizer lane, vectors computed on the
model's thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from fmapi_common.admission import Admit
from fmapi_common.errors import InvalidArgument, NotFound

from .batcher import DynamicBatcher
from .model import Encoder, Tokenizer, Tokens
from .tokenization import TokenizerLanes


@dataclass
class EmbedOptions:
    normalize: bool = True
    instruction: str = ""
    truncate: bool = True
    dimensions: int = 0


@dataclass
class EmbedResult:
    vectors: np.ndarray  # (n, d) float32
    input_tokens: int
    admission: Any = None  # what ``admit`` returned


class HostedModel:
    def __init__(self, encoder: Encoder, batcher: DynamicBatcher) -> None:
        self.encoder = encoder
        self.batcher = batcher
        self.lanes = TokenizerLanes(encoder)


class Embedder:
    def __init__(self, models: dict[str, HostedModel], max_inputs: int,
                 admit_linger: float = 0.0) -> None:
        self.models = models
        self.max_inputs = max_inputs
        # Seconds an admission may wait for company while its model's lanes are all busy.
        self.admit_linger = admit_linger

    def model(self, name: str) -> HostedModel:
        hosted = self.models.get(name)
        if hosted is None:
            raise NotFound(
                f"model '{name}' is not hosted by this embedding server", param="model",
                reason="model_not_found",
            )
        return hosted

    async def count_tokens(self, model: str, inputs: list[str | list[int]], opts: EmbedOptions) -> int:
        """The tokens ``embed`` would charge for these inputs, with its refusals; nothing runs."""
        _, tokens = await self._prepare(model, inputs, opts)
        return sum(len(t.ids) for t in tokens)

    async def embed(self, model: str, inputs: list[str | list[int]], opts: EmbedOptions,
                    admit: Admit | None = None) -> EmbedResult:
        """The vectors of ``inputs``; with ``admit``, the request is admitted on its exact token
        count after it is checked and tokenized, and before the model sees it (it waits for its
        batch meanwhile: see the batcher). While the model's lanes are all busy, the admission
        may wait ``admit_linger`` for others to go in the same call."""
        hosted, tokens = await self._prepare(model, inputs, opts)
        used = sum(len(t.ids) for t in tokens)
        gate = None if admit is None else asyncio.ensure_future(
            admit(used, 0, linger=self.admit_linger if hosted.batcher.busy else 0.0))
        try:
            vectors = np.asarray(await hosted.batcher.submit(tokens, used, gate), dtype=np.float32)
        finally:
            if gate is not None and not gate.done():  # the caller went away: withdraw it
                gate.cancel()
        admission = None if gate is None else gate.result()
        if opts.dimensions:
            vectors = vectors[:, : opts.dimensions]
        if opts.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return EmbedResult(vectors, used, admission)

    async def _prepare(self, model: str, inputs: list[str | list[int]],
                       opts: EmbedOptions) -> tuple[HostedModel, list[Tokens]]:
        """Validate and tokenize (on a tokenizer lane): the hosted model and the model's input."""
        hosted = self.model(model)
        enc = hosted.encoder
        if not inputs:
            raise InvalidArgument("input must not be empty", param="input")
        if len(inputs) > self.max_inputs:
            raise InvalidArgument(
                f"input has {len(inputs)} items; at most {self.max_inputs} are allowed", param="input"
            )
        if opts.dimensions and not (0 < opts.dimensions <= enc.dimensions):
            raise InvalidArgument(
                f"dimensions must be between 1 and {enc.dimensions}", param="dimensions"
            )
        size = sum(len(item) for item in inputs)
        return hosted, await hosted.lanes.run(size, partial(_tokenize, inputs, opts, enc))


def _tokenize(inputs: list[str | list[int]], opts: EmbedOptions, enc: Encoder,
              tok: Tokenizer) -> list[Tokens]:
    """The inputs as the model takes them (on a tokenizer lane: CPU-heavy for long inputs)."""
    texts = [_text(i, item, enc, tok) for i, item in enumerate(inputs)]
    if opts.instruction:
        texts = [opts.instruction + t for t in texts]
    tokens = tok.tokenize(texts)
    limit = enc.max_input_tokens
    if not opts.truncate:
        too_long = next((i for i, t in enumerate(tokens) if t.count > limit), None)
        if too_long is not None:
            raise InvalidArgument(
                f"input[{too_long}] has {tokens[too_long].count} tokens; this model takes at most "
                f"{limit}",
                param="input",
            )
    return tokens


def _text(i: int, item: str | list[int], enc: Encoder, tok: Tokenizer) -> str:
    """Input ``i`` as text (token ids are decoded); refuses empty inputs and unknown ids."""
    if isinstance(item, str):
        text = item
    else:
        if not item:
            raise InvalidArgument(f"input[{i}] is an empty token list", param="input")
        bad = next((t for t in item if t < 0 or t >= enc.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(
                f"input[{i}] has token id {bad}, outside the model's vocabulary "
                f"(0..{enc.vocab_size - 1})",
                param="input",
            )
        text = tok.decode(list(item))
    if not text.strip():
        raise InvalidArgument(f"input[{i}] is empty", param="input")
    return text
