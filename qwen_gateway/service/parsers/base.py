"""What every output parser shares: the parser protocol, plain text, and a buffer that finds tags.

A parser sees one choice's generated text in order, piece by piece, with the special tokens the engine
marked in each piece (``TextDelta.specials``), and turns it into choice events. Parsers chain: the
reasoning parser hands its answer text (with its marks) to the tool-call parser, which hands plain
text on as content.

Tags are found in one of two ways. A tag that is a special token of the model's vocabulary (Qwen's
``<tool_call>`` 151657, ``</tool_call>`` 151658, ``<think>`` 151667, ``</think>`` 151668) is real only
where the engine marked that token: the same characters written as ordinary text (a model quoting the
format) are text, and nothing needs holding back, because a real tag always arrives whole. A tag that
is not a special token (or any tag, when the engine can't mark tokens) is matched as text; then only a
tail that is a proper prefix of the tag is held back, never more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from qwen_gateway.service.events import ChoiceEvent, ContentDelta

# (offset in the text, token id) of special tokens; None: the engine can't tell.
Specials = tuple[tuple[int, int], ...] | None


class OutputParser(Protocol):
    def feed(self, text: str, specials: Specials = None) -> list[ChoiceEvent]:
        """Events for a new piece of generated text (possibly none, while text is held back)."""

    def finish(self) -> list[ChoiceEvent]:
        """Events for whatever was held back, at the end of the choice."""

    @property
    def done(self) -> bool:
        """True once the parser wants no more output (a single tool call is complete)."""

    @property
    def tool_calls(self) -> int:
        """Complete or started tool calls so far."""


class PlainText:
    """Every character is answer content."""

    __slots__ = ("_index",)

    def __init__(self, index: int) -> None:
        self._index = index

    def feed(self, text: str, specials: Specials = None) -> list[ChoiceEvent]:
        return [ContentDelta(self._index, text)] if text else []

    def finish(self) -> list[ChoiceEvent]:
        return []

    @property
    def done(self) -> bool:
        return False

    @property
    def tool_calls(self) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class Tag:
    """A markup tag and its special-token id in the model's vocabulary (None: plain text there)."""

    text: str
    token_id: int | None

    @classmethod
    def of(cls, text: str, special_tokens: Mapping[str, int]) -> Tag:
        return cls(text, special_tokens.get(text))


class Buffer:
    """Text not yet decided on, with the special tokens marked in it (offsets into :attr:`text`)."""

    __slots__ = ("marks", "text")

    def __init__(self) -> None:
        self.text = ""
        self.marks: list[tuple[int, int]] | None = []

    def add(self, text: str, specials: Specials) -> None:
        if specials is None:
            self.marks = None  # from here on the engine doesn't mark tokens: match tags as text
        elif self.marks is not None:
            base = len(self.text)
            self.marks.extend((base + at, tid) for at, tid in specials)
        self.text += text

    def find(self, tag: Tag, start: int = 0) -> tuple[int, int]:
        """(index of the first real ``tag`` at or after ``start`` or -1, and where text that could
        still become that tag begins: everything before it is safe to release)."""
        if tag.token_id is not None and self.marks is not None:
            for at, tid in self.marks:
                if at >= start and tid == tag.token_id and self.text.startswith(tag.text, at):
                    return at, at
            return -1, len(self.text)
        at = self.text.find(tag.text, start)
        if at >= 0:
            return at, at
        return -1, len(self.text) - _partial_suffix(self.text, tag.text, start)

    def take(self, n: int) -> tuple[str, Specials]:
        """Remove and return the first ``n`` characters with their marks (offsets from 0)."""
        text, self.text = self.text[:n], self.text[n:]
        if self.marks is None:
            return text, None
        taken = tuple((at, tid) for at, tid in self.marks if at < n)
        self.marks = [(at - n, tid) for at, tid in self.marks if at >= n]
        return text, taken


def _partial_suffix(text: str, tag: str, start: int) -> int:
    """Length of the longest tail of ``text[start:]`` that is a proper prefix of ``tag``."""
    for size in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
