"""Messages -> prompt token ids, through the checkpoint's own chat template."""

from __future__ import annotations

import json
import threading
from typing import Any

from qwen_gateway.engines.base import ChatMessage, GenerationRequest, ImagePart, TextPart, VideoPart
from qwen_gateway.engines.pieces import PIECE_CHARS, clearly_over
from qwen_gateway.engines.template_messages import message_dict, tool_dict
from qwen_gateway.errors import ContextLengthExceeded, InvalidParameter

THINK_OPEN = "<think>\n"


class PromptRenderer:
    """Renders requests with one tokenizer. Thread-safe: calls into the tokenizer are serialized,
    because a fast tokenizer's Rust object refuses a mutable borrow while another thread encodes."""

    def __init__(self, tokenizer: Any, lock: threading.Lock) -> None:
        self._tokenizer = tokenizer
        self._lock = lock
        template = tokenizer.chat_template
        self._template_text = template if isinstance(template, str) else json.dumps(template)
        self._uses_reasoning = "reasoning_content" in self._template_text
        self._has_think_markup = "<think>" in self._template_text

    def render(self, request: GenerationRequest, max_context: int | None = None) -> list[int]:
        """Prompt ids exactly as they will be fed to the model. With ``max_context``, a prompt of
        ``max_context`` tokens or more raises ContextLengthExceeded, in time bounded by the context
        rather than by the prompt's size."""
        if max_context is not None:
            # A message's own text is part of the prompt: one that alone cannot fit is refused
            # before the template copies it around.
            for message in request.messages:
                content = message.text()
                if len(content) > PIECE_CHARS:
                    self._refuse_if_too_long(content, max_context)
        text = self.render_text(request)
        if max_context is not None and len(text) > PIECE_CHARS:
            self._refuse_if_too_long(text, max_context)
        ids = self.encode(text)
        if max_context is not None and (not ids or len(ids) >= max_context):
            raise _too_long(max_context)
        return ids

    def _refuse_if_too_long(self, text: str, max_context: int) -> None:
        """Refuse ``text`` once counting it piece by piece shows it clearly past the context
        (pieces.py); each batch of pieces holds the tokenizer's lock for one call only."""

        def count(pieces: list[str]) -> int:
            with self._lock:
                encoded = self._tokenizer(pieces, add_special_tokens=False)["input_ids"]
            return sum(len(ids) for ids in encoded)

        if clearly_over(text, max_context, count):
            raise _too_long(max_context)

    def render_text(self, request: GenerationRequest) -> str:
        messages = list(request.messages)
        continuation = ""
        if messages and messages[-1].role == "assistant" and messages[-1].partial:
            # Partial mode: the model continues the assistant's text, so it is appended after the
            # generation prompt verbatim instead of being closed as a finished turn.
            continuation = messages.pop().text()
        kwargs: dict[str, Any] = {}
        if request.thinking is not None:
            # Qwen3-style templates read this variable; others ignore it.
            kwargs["enable_thinking"] = request.thinking.enabled
        tools = [tool_dict(t) for t in request.tools] or None
        try:
            with self._lock:
                text = self._tokenizer.apply_chat_template(
                    [self.message_dict(m) for m in messages],
                    tools=tools,
                    add_generation_prompt=True,
                    tokenize=False,
                    **kwargs,
                )
        except RecursionError:
            raise InvalidParameter("The input is nested too deeply.", param="messages") from None
        except Exception as exc:
            # jinja2.TemplateError, including the template's own raise_exception(...) messages
            # ("No user query found in messages."), and transformers' ValueError for a conversation
            # with nothing left to render: the request, not the engine, is at fault.
            if type(exc).__module__.startswith("jinja2") or isinstance(exc, ValueError):
                raise InvalidParameter(f"chat template: {exc}", param="messages") from None
            raise
        if not isinstance(text, str):  # some tokenizers hand back a list for a batch of one
            text = text[0]
        if request.thinking is not None and request.thinking.enabled and not self._has_think_markup:
            # A checkpoint without thinking markup of its own (QwQ/QVQ-style serving of a plain chat
            # model): the reasoning block is opened here, and closed by the model or the budget.
            text = str(text) + THINK_OPEN
        return str(text) + continuation

    def encode(self, text: str) -> list[int]:
        with self._lock:
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids]

    def tokens(self, text: str) -> list[tuple[int, str]]:
        """(id, text) of each token of ``text``, no template, no special tokens added."""
        ids = self.encode(text)
        with self._lock:
            return [(i, str(self._tokenizer.decode([i]))) for i in ids]

    def message_dict(self, message: ChatMessage) -> dict[str, Any]:
        return message_dict(message, _content(message), reasoning=self._uses_reasoning)


def _content(message: ChatMessage) -> str | list[dict[str, Any]]:
    """Text, or for a message with media the parts list Qwen-VL templates read (one pad per part)."""
    content = message.content
    if isinstance(content, str) or not any(isinstance(p, ImagePart | VideoPart) for p in content):
        return message.text()
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, TextPart):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            parts.append({"type": "image"})
        else:
            parts.append({"type": "video"})
    return parts


def _too_long(max_context: int) -> ContextLengthExceeded:
    return ContextLengthExceeded.input_range(max_context)
