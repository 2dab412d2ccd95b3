"""Requests as the variables of a Hugging Face chat template (``messages``, ``tools``).

Shared by the local engine, which renders its prompt with them, and the openai engine's token counter,
which renders the prompt an upstream will see (with the same checkpoint's template) to count it: both
must hand the template the same conversation, tool calls and tool results included.
"""

from __future__ import annotations

import json
from typing import Any

from qwen_gateway.engines.base import ChatMessage, ToolSpec


def tool_dict(tool: ToolSpec) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = dict(tool.parameters)
    return {"type": "function", "function": function}


def message_dict(
    message: ChatMessage, content: str | list[dict[str, Any]], *, reasoning: bool
) -> dict[str, Any]:
    """One message; ``content`` as the caller renders it (text, or a local engine's media parts);
    ``reasoning``: the template reads earlier turns' ``reasoning_content``."""
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.reasoning_content is not None and reasoning:
        out["reasoning_content"] = message.reasoning_content
    return out


def _arguments(text: str) -> Any:
    # Qwen templates write `arguments | tojson`: a dict renders as the JSON object the model was trained
    # on, while a string would render double-encoded. Unparseable text is passed through unchanged.
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text
