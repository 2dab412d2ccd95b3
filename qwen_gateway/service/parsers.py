"""Output parsers: one choice's generated text in, protocol-neutral choice events out.

A parser sees the engine's text deltas of one choice in order and decides what each piece of text is:
answer content, reasoning, or part of a tool call. Model families that mark reasoning (Qwen3
``<think>``) or tool calls (Hermes-style ``<tool_call>``) get their own parser class, chosen per
request by :func:`parser_for`; everything else is plain answer text.
"""

from __future__ import annotations

from typing import Protocol

from qwen_gateway.service.events import ChoiceEvent, ContentDelta


class OutputParser(Protocol):
    def feed(self, text: str) -> list[ChoiceEvent]:
        """Events for a new piece of generated text (possibly none, while text is held back)."""

    def finish(self) -> list[ChoiceEvent]:
        """Events for whatever was held back, at the end of the choice."""


class PlainText:
    """Every character is answer content."""

    __slots__ = ("_index",)

    def __init__(self, index: int) -> None:
        self._index = index

    def feed(self, text: str) -> list[ChoiceEvent]:
        return [ContentDelta(self._index, text)] if text else []

    def finish(self) -> list[ChoiceEvent]:
        return []


def parser_for(index: int) -> OutputParser:
    """The parser for choice ``index`` of a request."""
    return PlainText(index)
