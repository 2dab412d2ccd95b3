"""Chat templates rendered for engines whose tokenizer is not a transformers one (llama.cpp's GGUF).

The template runs in exactly the environment a transformers tokenizer's ``apply_chat_template`` uses
(transformers' sandboxed Jinja: ``ImmutableSandboxedEnvironment`` with its ``tojson``,
``raise_exception`` and ``strftime_now``), so a GGUF's template renders as the same checkpoint's
tokenizer would render it, and the two engines bill the same prompt. Importing transformers is the cost:
:func:`warm_up` lets an engine pay it on a worker thread while its model loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def warm_up() -> None:
    """Import the renderer (several seconds on a busy CPU; torch is not imported)."""
    from transformers.utils.chat_template_utils import render_jinja_template  # noqa: F401


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """``messages`` rendered with ``template``; ``variables`` (``bos_token``, ``enable_thinking`` ...)
    are the template's globals, as a tokenizer passes its special tokens. Jinja's errors (including the
    template's own ``raise_exception``) propagate: the caller maps them to a 400."""
    from transformers.utils.chat_template_utils import render_jinja_template

    # Typed loosely on purpose: transformers' annotations differ between its releases.
    render: Any = render_jinja_template
    rendered, _ = render(
        conversations=[[dict(m) for m in messages]],
        tools=tools,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **variables,
    )
    return str(rendered[0])


def tool_format(template: str) -> str | None:
    """The tool-call markup a chat template teaches (a parser name of service/parsers)."""
    if "<function=" in template:
        return "qwen3_coder"
    if "<tool_call>" in template:
        return "hermes"
    return None
