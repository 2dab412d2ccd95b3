"""Counting tokens on the gateway's side, for when the upstream does not say how many it used.

An upstream normally reports usage on its last chunk (we always ask, ``stream_options.include_usage``).
When it reports none, or the stream is cut short (client gone, upstream died), the request is billed
from this count instead, and its :class:`Usage` says ``counted_locally``. With the model's tokenizer
(a checkpoint directory: ``tokenizer.json`` plus the chat template from ``tokenizer_config.json`` or
``chat_template.jinja``) the prompt is rendered and tokenized as the upstream would; without one the
count is an estimate of 4 bytes a token.

The same count checks a prompt against the context before it goes upstream (:meth:`TokenCounter.prompt`
with ``limit``): a prompt too long for it is refused as the local engines refuse it, after tokenizing
about a context's worth of it rather than all of it.

Torch-free: the Rust ``tokenizers`` library and a sandboxed Jinja environment, never transformers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen_gateway.engines.base import ChatMessage, ToolSpec
from qwen_gateway.engines.pieces import PIECE_CHARS, clearly_over
from qwen_gateway.engines.template_messages import message_dict, tool_dict
from qwen_gateway.errors import ContextLengthExceeded, StartupError

log = logging.getLogger(__name__)

_BYTES_PER_TOKEN = 4  # the estimate without a tokenizer (a typical BPE average on English text)
# A prompt bound over this many bytes is counted off the event loop (rendering and tokenizing 4 KiB took
# 0.8 ms here, 64 KiB 20 ms: time every other request on the loop would wait).
OFF_LOOP_BYTES = 8 * 1024
# Template text of a prompt beyond its messages' own (role headers, a default system prompt, the
# tool-calling instructions Qwen's templates add, about 700 bytes): a generous allowance, for a bound.
_TEMPLATE_BYTES = 2048
_MESSAGE_BYTES = 32


class TokenCounter:
    def __init__(self, tokenizer_dir: str | None) -> None:
        self._tokenizer: Any = None
        self._template: Any = None
        if tokenizer_dir is None:
            return
        from tokenizers import Tokenizer

        root = Path(tokenizer_dir).expanduser()
        try:
            self._tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as exc:
            raise StartupError(f"tokenizer {tokenizer_dir!r}: cannot read tokenizer.json ({exc})") from None
        self._template = _chat_template(root)

    @property
    def exact(self) -> bool:
        return self._tokenizer is not None

    @property
    def exact_prompts(self) -> bool:
        """Prompts are counted, not estimated: a tokenizer and the chat template to render them."""
        return self._tokenizer is not None and self._template is not None

    def text(self, pieces: Sequence[str]) -> int:
        """Tokens of generated text (the pieces joined, so a token split across pieces counts once)."""
        joined = "".join(pieces)
        if not joined:
            return 0
        if self._tokenizer is None:
            return _estimate(joined)
        return len(self._tokenizer.encode(joined, add_special_tokens=False).ids)

    def prompt(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec], *, limit: int | None = None
    ) -> int:
        """Tokens of the prompt as the chat template renders it (text parts only: media tokens depend
        on the upstream's processor, which only its own usage report knows).

        With ``limit`` and an exact count (a tokenizer with its chat template), a prompt of ``limit``
        tokens or more raises :class:`ContextLengthExceeded`, in time bounded by ``limit`` rather than
        by the prompt's size. An estimate never refuses: it may be off either way."""
        plain = [{"role": m.role, "content": m.text()} for m in messages]
        if self._tokenizer is None or self._template is None:
            return _estimate_prompt(plain)
        if limit is not None:
            # A message that alone cannot fit is refused before the template copies it around.
            for message in plain:
                if len(message["content"]) > PIECE_CHARS:
                    self._refuse_if_too_long(message["content"], limit)
        from jinja2 import TemplateError

        try:
            rendered = self._template.render(
                # As the upstream's template gets them (wire.py sends names, tool calls and tool
                # results, not earlier turns' reasoning), tools with their descriptions.
                messages=[message_dict(m, m.text(), reasoning=False) for m in messages],
                tools=[tool_dict(t) for t in tools] or None,
                add_generation_prompt=True,
            )
        except (TemplateError, ValueError, RecursionError) as exc:
            # The template refuses this conversation (its raise_exception, e.g. "No user query found
            # in messages."): the upstream judges it; here it is estimated, never refused.
            log.debug("chat template did not render the prompt (%s): estimated", exc)
            return _estimate_prompt(plain)
        if limit is not None and len(rendered) > PIECE_CHARS:
            self._refuse_if_too_long(rendered, limit)
        count = len(self._tokenizer.encode(rendered, add_special_tokens=False).ids)
        if limit is not None and count >= limit:
            raise ContextLengthExceeded.input_range(limit)
        return count

    def _refuse_if_too_long(self, text: str, limit: int) -> None:
        """Refuse ``text`` once counting it piece by piece shows it clearly past ``limit`` (pieces.py)."""

        def count(pieces: list[str]) -> int:
            return sum(len(e.ids) for e in self._tokenizer.encode_batch(pieces, add_special_tokens=False))

        if clearly_over(text, limit, count):
            raise ContextLengthExceeded.input_range(limit)


def prompt_bound(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> int:
    """At least as many as the prompt's tokens, without tokenizing: the UTF-8 bytes of everything the
    template renders from the request (a byte-level BPE token is at least one byte) plus an allowance
    for the template's own text. What decides whether a prompt must be counted at all."""
    total = _TEMPLATE_BYTES
    for message in messages:
        total += _MESSAGE_BYTES + _bytes(message.text())
        for text in (message.name, message.tool_call_id, message.reasoning_content):
            if text:
                total += _bytes(text)
        for call in message.tool_calls:
            total += _MESSAGE_BYTES + _bytes(call.id) + _bytes(call.name) + _bytes(call.arguments)
    for tool in tools:
        # The template dumps each tool's JSON, in whatever spacing: twice its compact size is ample.
        spec = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
        total += 2 * len(json.dumps(spec, ensure_ascii=False, default=dict).encode("utf-8"))
    return total


def _bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))  # isascii() is O(1) in CPython


def _estimate_prompt(plain: list[dict[str, str]]) -> int:
    return _estimate("".join(m["content"] for m in plain)) + 4 * len(plain)


def _estimate(text: str) -> int:
    return max(1, -(-len(text.encode("utf-8")) // _BYTES_PER_TOKEN))


def _chat_template(root: Path) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source: str | None = None
    if (root / "chat_template.jinja").is_file():
        source = (root / "chat_template.jinja").read_text()
    elif (root / "tokenizer_config.json").is_file():
        value = json.loads((root / "tokenizer_config.json").read_text()).get("chat_template")
        source = value if isinstance(value, str) else None
    if source is None:
        log.warning("tokenizer %s has no chat template: prompts are counted as plain text", root)
        return None

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    return env.from_string(source)
