"""The GGUF's vocabulary and chat template behind the slice of a transformers tokenizer that the local
engine's :class:`~qwen_gateway.engines.local.prompt.PromptRenderer` uses, so both engines render and
count prompts with one piece of code (partial mode, thinking switch, tools, the context-length check).
"""

from __future__ import annotations

from typing import Any

from qwen_gateway.engines.llamacpp.model import GgufModel
from qwen_gateway.engines.local.chat_template import render_chat_template


class GgufTokenizer:
    def __init__(self, model: GgufModel, chat_template: str) -> None:
        self._model = model
        self.chat_template = chat_template
        # The variables a transformers tokenizer passes to its template (its special tokens map).
        self._variables = {
            "bos_token": model.token_text(model.bos_id),
            "eos_token": model.token_text(model.eos_id),
        }

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str:
        if tokenize:  # PromptRenderer tokenizes the text itself
            raise NotImplementedError("GgufTokenizer renders text only")
        return render_chat_template(
            self.chat_template,
            conversation,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **{**self._variables, **kwargs},
        )

    def __call__(self, text: str | list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        if add_special_tokens:
            raise NotImplementedError("prompts are rendered with their special tokens already")
        if isinstance(text, str):
            return {"input_ids": self._model.tokenize(text)}
        return {"input_ids": [self._model.tokenize(t) for t in text]}

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._model.decode(token_ids, skip_special_tokens)
