"""Prompt rendering: chat templates and tokenization with exactly one BOS.

Works on any Hugging Face tokenizer (``transformers`` ``PreTrainedTokenizerBase``). The rule
for BOS: encode with the tokenizer's own special tokens (so a model whose tokenizer adds BOS gets
it on raw completion prompts), and when a chat template already wrote BOS as text as well, drop
the duplicate. Models whose tokenizer lost its BOS flag (Gemma from GGUF) are fixed once at
import time (see ``modelimport``), not here.
"""

from __future__ import annotations

from typing import Any

from fmapi_common.errors import FailedPrecondition, InvalidArgument


class PromptRenderer:
    def __init__(self, tokenizer: Any, chat_template: str | None = None, model: str = "model"):
        self.tokenizer = tokenizer
        self.default_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.model = model
        self.bos_id: int | None = getattr(tokenizer, "bos_token_id", None)

    # ------------------------------------------------------------ chat

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template: str | None = None,
    ) -> str:
        """The prompt text for a conversation, ending with the assistant's turn opened."""
        chosen = template or self.default_template
        if not chosen:
            raise FailedPrecondition(
                f"{self.model} has no chat template: use the completions API, send a "
                "chat_template, or start the server with FMAPI_GENERATION_CHAT_TEMPLATE",
                param="messages",
            )
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=chosen,
                add_generation_prompt=True,
                tokenize=False,
            )
        except TemplateSyntaxError as exc:
            param = "chat_template" if template else "messages"
            raise InvalidArgument(
                f"the chat template does not compile: {exc}", param=param
            ) from None
        except TemplateError as exc:
            # Templates reject conversations they cannot render (e.g. roles out of order).
            raise InvalidArgument(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from None
        if not isinstance(text, str):  # some transformers versions return a list for batches
            text = text[0]
        return text

    # ------------------------------------------------------------ tokens

    def encode(self, text: str) -> list[int]:
        """Token ids for a prompt: the tokenizer's special tokens, with BOS never doubled."""
        ids = list(self.tokenizer.encode(text, add_special_tokens=True))
        bos = self.bos_id
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
