"""Output parsers: one choice's generated text in, protocol-neutral choice events out.

Parsers are registered by the markup family they read (the engine says which its checkpoint's chat
template uses, ``Capabilities.tool_format`` / ``reasoning_format``) and imported lazily from a table,
one file per family: ``qwen3`` (``<think>`` reasoning), ``hermes`` (``<tool_call>`` JSON calls of
Qwen2.5, Qwen3 and Qwen3-VL), ``qwen3_coder`` (its XML-style ``<function=...>`` calls). Tools offered
to an engine whose markup has no parser here are refused (the calls could not be read).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qwen_gateway.engines.base import Capabilities
from qwen_gateway.service.parsers.base import OutputParser, PlainText, Specials

__all__ = ["OutputParser", "ParserChoice", "PlainText", "Specials", "parser_for"]

# family -> "module:Class"
TOOL_PARSERS: dict[str, str] = {
    "hermes": "qwen_gateway.service.parsers.hermes:HermesToolParser",
    "qwen3_coder": "qwen_gateway.service.parsers.qwen3_coder:Qwen3CoderToolParser",
}
REASONING_PARSERS: dict[str, str] = {
    "qwen3": "qwen_gateway.service.parsers.qwen3:Qwen3ReasoningParser",
}


@dataclass(frozen=True, slots=True)
class ParserChoice:
    """What a request's output may hold, as far as parsing goes."""

    thinking: bool = False  # the output starts with a reasoning block
    tools: bool = False  # tools were offered: calls are parsed
    parallel_tool_calls: bool = False
    forced_call: bool = False  # a named tool_choice constrains the output to one call
    # Each offered tool's parameters schema by name (formats that write values as text need types).
    tool_parameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def tool_parsing(capabilities: Capabilities) -> bool:
    """Whether calls in this engine's output can be parsed (its markup has a parser, or the engine
    parses them itself)."""
    return capabilities.parses_output or capabilities.tool_format in TOOL_PARSERS


def parser_for(index: int, capabilities: Capabilities, choice: ParserChoice) -> OutputParser:
    """The parser chain for choice ``index``: reasoning, then tool calls, then plain content."""
    specials = capabilities.special_tokens
    parser: OutputParser = PlainText(index)
    if capabilities.parses_output:  # reasoning and calls arrive as their own engine events
        return parser
    if choice.tools and capabilities.tool_format in TOOL_PARSERS:
        cls = _load(TOOL_PARSERS[capabilities.tool_format])
        parser = cls(
            index,
            specials,
            parallel=choice.parallel_tool_calls,
            text_tags=choice.forced_call,
            parameters=choice.tool_parameters,
        )
    if choice.thinking:
        cls = _load(REASONING_PARSERS[capabilities.reasoning_format or "qwen3"])
        parser = cls(index, parser, specials)
    return parser
