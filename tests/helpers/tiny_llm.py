"""A tiny random-weight Llama with a locally trained BPE tokenizer, for tests.

No download: the tokenizer is trained with ``tokenizers`` on a small built-in corpus and the
weights are random (seeded, so every build gives the same model). vLLM on CPU starts it in well
under a minute and decodes in milliseconds. Its output is gibberish; tests check the machinery
(streaming, stops, lengths, constrained decoding, cancellation), not the prose.

Shape: hidden 256, 2 layers, 4 heads of 64 (vLLM's CPU attention refuses head_dim 16).
The tokenizer adds ``<s>`` (BOS) in front of every encoding, and the chat template also starts
with ``{{ bos_token }}``, so a server that does not de-duplicate BOS gets caught by tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
CHAT_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]

# A ChatML-like template: each turn is "<|role|>\n{content}<|end|>\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\nTools: {{ tools | tojson }}<|end|>\n{% endif %}"
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the quick brown fox jumps over the lazy dog while a small model writes tokens one by one "
    "hello world how are you today i am fine thank you very much for asking about the weather "
    "it is sunny and warm in the city but cold and rainy near the sea where boats sail slowly "
    'numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2024 appear in json such as {"a": 1} '
    '[true, false, null] "name": "value" , : { } [ ] tools call functions with arguments '
    "get_weather location city unit celsius fahrenheit answer question system user assistant "
    "streaming deltas stop length finish reason usage prompt completion sampling temperature "
)


def _corpus() -> list[str]:
    lines = [_WORDS]
    words = _WORDS.split()
    # Some variety so BPE learns merges across word pairs and digits.
    for i in range(200):
        lines.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)))
        lines.append(f'{i} {i * 3} {{"n": {i}, "ok": {"true" if i % 2 else "false"}}}')
    return lines


def build_tiny_tokenizer(path: str | os.PathLike):
    """Only the tokenizer (with its chat template) in ``path``; returns the loaded tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return _build_tokenizer(path)


def _build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=[PAD, BOS, EOS, UNK, *CHAT_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=CHAT_SPECIALS,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def build_tiny_llama(path: str | os.PathLike) -> Path:
    """Write the tiny model to ``path`` (created) and return it. Takes a few seconds."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer(path)
    end_id = tok.convert_tokens_to_ids("<|end|>")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(path), safe_serialization=True)
    # The end-of-turn marker also ends a generation (as in real chat models).
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, end_id],
        pad_token_id=tok.pad_token_id,
    ).save_pretrained(str(path))
    (path / "fmapi-tiny.json").write_text(json.dumps({"kind": "tiny-llama", "seed": 0}))
    return path


# Settings that make a tiny model start fast and decode predictably on 2 CPU cores.
# A generation long enough that a client leaving after its first tokens always leaves before the
# end: the tiny model decodes hundreds of tokens a second on a fast CPU, so 200 could be done
# before the client's cancel reached the engine (CI saw exactly that).
LONG_GENERATION = 1500

TINY_ENGINE_ENV = {
    "FMAPI_GENERATION_MAX_MODEL_LEN": "2048",
    "FMAPI_GENERATION_CPU_KVCACHE_SPACE_GIB": "1",
    "FMAPI_GENERATION_ENFORCE_EAGER": "true",
}
