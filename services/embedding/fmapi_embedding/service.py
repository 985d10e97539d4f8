"""Embedding domain logic: validation, instruction, truncation, batching, normalization.

No gRPC here: the servicer converts protos to these calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmapi_common.errors import InvalidArgument, NotFound

from .batcher import DynamicBatcher
from .model import Encoder


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


class HostedModel:
    def __init__(self, encoder: Encoder, batcher: DynamicBatcher) -> None:
        self.encoder = encoder
        self.batcher = batcher


class Embedder:
    def __init__(self, models: dict[str, HostedModel], max_inputs: int) -> None:
        self.models = models
        self.max_inputs = max_inputs

    def model(self, name: str) -> HostedModel:
        hosted = self.models.get(name)
        if hosted is None:
            raise NotFound(
                f"model '{name}' is not hosted by this embedding server", param="model",
                reason="model_not_found",
            )
        return hosted

    async def embed(self, model: str, inputs: list[str | list[int]], opts: EmbedOptions) -> EmbedResult:
        hosted = self.model(model)
        enc = hosted.encoder
        if not inputs:
            raise InvalidArgument("input must not be empty", param="input")
        if len(inputs) > self.max_inputs:
            raise InvalidArgument(
                f"input has {len(inputs)} items; at most {self.max_inputs} are allowed", param="input"
            )
        texts: list[str] = []
        for i, item in enumerate(inputs):
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
                text = enc.decode(list(item))
            if not text.strip():
                raise InvalidArgument(f"input[{i}] is empty", param="input")
            texts.append(opts.instruction + text if opts.instruction else text)
        if opts.dimensions and not (0 < opts.dimensions <= enc.dimensions):
            raise InvalidArgument(
                f"dimensions must be between 1 and {enc.dimensions}", param="dimensions"
            )
        counts = enc.count_tokens(texts)
        limit = enc.max_input_tokens
        if not opts.truncate:
            too_long = next((i for i, c in enumerate(counts) if c > limit), None)
            if too_long is not None:
                raise InvalidArgument(
                    f"input[{too_long}] has {counts[too_long]} tokens; this model takes at most "
                    f"{limit}",
                    param="input",
                )
        used = [min(c, limit) for c in counts]
        vectors = np.asarray(await hosted.batcher.submit(texts, sum(used)), dtype=np.float32)
        if opts.dimensions:
            vectors = vectors[:, : opts.dimensions]
        if opts.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return EmbedResult(vectors, sum(used))
