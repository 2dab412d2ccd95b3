"""Counting tokens on the gateway's side, for when the upstream does not say how many it used.

An upstream normally reports usage on its last chunk (we always ask, ``stream_options.include_usage``).
When it reports none, or the stream is cut short (client gone, upstream died), the request is billed
from this count instead, and its :class:`Usage` says ``counted_locally``. With the model's tokenizer
(a checkpoint directory: ``tokenizer.json`` plus the chat template from ``tokenizer_config.json`` or
``chat_template.jinja``) the prompt is rendered and tokenized as the upstream would; without one the
count is an estimate of 4 bytes a token.

Torch-free: the Rust ``tokenizers`` library and a sandboxed Jinja environment, never transformers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen_gateway.engines.base import ChatMessage, ToolSpec
from qwen_gateway.errors import StartupError

log = logging.getLogger(__name__)

_BYTES_PER_TOKEN = 4  # the estimate without a tokenizer (a typical BPE average on English text)


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

    def text(self, pieces: Sequence[str]) -> int:
        """Tokens of generated text (the pieces joined, so a token split across pieces counts once)."""
        joined = "".join(pieces)
        if not joined:
            return 0
        if self._tokenizer is None:
            return _estimate(joined)
        return len(self._tokenizer.encode(joined, add_special_tokens=False).ids)

    def prompt(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> int:
        """Tokens of the prompt as the chat template renders it (text parts only: media tokens depend
        on the upstream's processor, which only its own usage report knows)."""
        plain = [{"role": m.role, "content": m.text()} for m in messages]
        if self._tokenizer is None or self._template is None:
            return _estimate("".join(str(m["content"]) for m in plain)) + 4 * len(plain)
        rendered = self._template.render(
            messages=plain,
            tools=[
                {"type": "function", "function": {"name": t.name, "parameters": t.parameters}} for t in tools
            ]
            or None,
            add_generation_prompt=True,
        )
        return len(self._tokenizer.encode(rendered, add_special_tokens=False).ids)


def _tool(tool: ToolSpec) -> dict[str, Any]:
    function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
    return {"type": "function", "function": function}


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
