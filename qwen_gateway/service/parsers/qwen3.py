"""Qwen3-style reasoning: ``<think>reasoning</think>answer``.

Used whenever thinking is on for a call. The parser starts inside the reasoning block: Qwen3 hybrids
open it themselves with ``<think>`` (dropped here), QwQ/QVQ-style templates and the local engine (for a
checkpoint without thinking markup of its own) open it in the generation prompt, so the output starts
with the reasoning itself. ``</think>`` ends it; the rest is the answer, handed to the next parser (tool
calls or plain content). A block that never closes is all reasoning (the answer was never reached).

Newlines around the block are layout, not text, exactly as Qwen3's chat template strips them when it
renders a past turn (``reasoning_content.strip('\\n')``, ``content.lstrip('\\n')``): leading newlines of
the reasoning and of the answer are dropped, and trailing newlines of the reasoning are held until
text follows them (then they are part of it) or ``</think>`` comes (then they are dropped).
"""

from __future__ import annotations

from collections.abc import Mapping

from qwen_gateway.service.events import ChoiceEvent, ReasoningDelta
from qwen_gateway.service.parsers.base import Buffer, OutputParser, Specials, Tag

THINK_START = "<think>"
THINK_END = "</think>"


class Qwen3ReasoningParser:
    """Reasoning first, then the answer through ``answer`` (the next parser in the chain)."""

    def __init__(self, index: int, answer: OutputParser, special_tokens: Mapping[str, int]) -> None:
        self._index = index
        self._answer = answer
        self._start = Tag.of(THINK_START, special_tokens)
        self._end = Tag.of(THINK_END, special_tokens)
        self._buf = Buffer()
        self._state = "start"  # start -> reasoning -> answer
        self._reasoned = False  # some reasoning text was emitted (leading newlines are gone)
        self._answer_started = False

    @property
    def done(self) -> bool:
        return self._answer.done

    @property
    def tool_calls(self) -> int:
        return self._answer.tool_calls

    def feed(self, text: str, specials: Specials = None) -> list[ChoiceEvent]:
        if self._state == "answer":
            return self._to_answer(text, specials)
        self._buf.add(text, specials)
        out: list[ChoiceEvent] = []
        if self._state == "start":
            if not self._skip_opening_tag():
                return out
            self._state = "reasoning"
        at, safe = self._buf.find(self._end)
        if at < 0:
            # Trailing newlines wait: they belong to the reasoning only if more of it follows.
            keep = len(self._buf.text[:safe].rstrip("\n"))
            out += self._reason(self._buf.take(keep)[0])
            return out
        reasoning, _ = self._buf.take(at)
        out += self._reason(reasoning.rstrip("\n"))
        self._buf.take(len(self._end.text))
        self._state = "answer"
        rest, marks = self._buf.take(len(self._buf.text))
        return out + self._to_answer(rest, marks)

    def finish(self) -> list[ChoiceEvent]:
        out: list[ChoiceEvent] = []
        if self._state != "answer":
            # Never closed: what is left is reasoning (a partial "</think>" was held as text).
            held = self._buf.take(len(self._buf.text))[0]
            if self._state == "start" and held.startswith(THINK_START):
                held = held[len(THINK_START) :]
            out += self._reason(held.rstrip("\n"))
        return out + self._answer.finish()

    def _skip_opening_tag(self) -> bool:
        """Drop a leading ``<think>``; False while the text could still turn out to be one."""
        text = self._buf.text.lstrip("\n")
        lead = len(self._buf.text) - len(text)
        at, _ = self._buf.find(self._start, lead)
        if at == lead:
            self._buf.take(lead + len(THINK_START))
            return True
        as_text = self._start.token_id is None or self._buf.marks is None
        # "", "<", "<th" ... could still become the tag when it is matched as text: wait for more.
        return not (as_text and THINK_START.startswith(text))

    def _reason(self, text: str) -> list[ChoiceEvent]:
        if not self._reasoned:
            text = text.lstrip("\n")
        if not text:
            return []
        self._reasoned = True
        return [ReasoningDelta(self._index, text)]

    def _to_answer(self, text: str, specials: Specials) -> list[ChoiceEvent]:
        if not self._answer_started:
            stripped = text.lstrip("\n")
            cut = len(text) - len(stripped)
            if not stripped:
                return []
            self._answer_started = True
            if specials is not None:
                specials = tuple((at - cut, tid) for at, tid in specials if at >= cut)
            text = stripped
        return self._answer.feed(text, specials)
