"""Hermes-style tool calls, as Qwen2.5, Qwen3 and Qwen3-VL chat templates teach them::

    <tool_call>
    {"name": "get_current_weather", "arguments": {"location": "杭州市"}}
    </tool_call>

Text before a call streams as content at once. A call streams in DashScope's delta shape: its first
delta carries the new ``id`` and the ``name`` (sent as soon as the name is complete and the arguments
have begun), later deltas carry the raw text of the ``arguments`` value as the model writes it, so the
pieces always join to exactly that value: a closing brace or an empty ``{}`` can't be lost (the
recurring bugs of parsers that re-serialize partially parsed JSON and diff the results).

Model output is never evaluated: a small scanner follows the JSON's structure (strings, escapes,
nesting) and ``json.loads`` decodes string values. A call whose text does not start like
``{"name": "...", "arguments": ...}`` (random weights, a model quoting the format) is given back as
content, tags included: nothing is lost and nothing fails. A ``<tool_call>`` inside a fenced code block
(an odd number of ```` ``` ```` before it) is content too: Qwen writes its calls outside any code.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

from qwen_gateway.service.events import ChoiceEvent, ContentDelta, ToolCallDelta
from qwen_gateway.service.parsers.base import Buffer, Specials, Tag

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
FENCE = "```"
_WS = " \t\r\n"


def new_call_id() -> str:
    """A DashScope-style call id: ``call_`` and 22 hex digits."""
    return "call_" + secrets.token_hex(11)


class HermesToolParser:
    """``<tool_call>`` JSON calls in the answer text of choice ``index``.

    ``parallel`` False (DashScope's default for ``parallel_tool_calls``) keeps the first call only and
    then reports :attr:`done`. ``text_tags`` matches the tags as text even where they are special
    tokens (output forced by a named ``tool_choice`` constraint may spell them with plain tokens).
    """

    def __init__(
        self,
        index: int,
        special_tokens: Mapping[str, int],
        *,
        parallel: bool = False,
        text_tags: bool = False,
        parameters: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        # ``parameters`` (the tools' schemas) is part of every tool parser's signature; Hermes calls
        # are JSON and carry their own types, so it needs none.
        del parameters
        self._index = index
        tokens = {} if text_tags else special_tokens
        self._start = Tag.of(CALL_START, tokens)
        self._end = Tag.of(CALL_END, tokens)
        self._parallel = parallel
        self._buf = Buffer()
        self._in_fence = False
        self._fence_tail = ""  # the last characters of content, for a fence split across pieces
        self._held_ws = ""  # whitespace before any text of a content run (dropped around calls)
        self._content_started = False
        self._call: _CallScanner | None = None
        self._calls = 0
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def tool_calls(self) -> int:
        return self._calls

    def feed(self, text: str, specials: Specials = None) -> list[ChoiceEvent]:
        if self._done:
            return []
        self._buf.add(text, specials)
        out: list[ChoiceEvent] = []
        while not self._done:
            if self._call is None:
                if not self._scan_content(out):
                    break
            elif not self._scan_call(out):
                break
        return out

    def finish(self) -> list[ChoiceEvent]:
        out: list[ChoiceEvent] = []
        if self._done:
            return out
        call, self._call = self._call, None
        rest = self._buf.take(len(self._buf.text))[0]
        if call is not None and not call.committed:
            # The answer ended inside something that never became a call: it was text.
            self._content(out, CALL_START + call.body + rest)
        elif call is None:
            self._content(out, rest)
            if self._held_ws and not self._calls:
                out.append(ContentDelta(self._index, self._held_ws))
        return out

    # -- content ---------------------------------------------------------------------------------------

    def _scan_content(self, out: list[ChoiceEvent]) -> bool:
        """Release content up to the next call; True when a call began (scan on)."""
        start = 0
        while True:
            at, safe = self._buf.find(self._start, start)
            if at < 0:
                self._content(out, self._buf.take(safe)[0])
                return False
            # The tail of released content counts too: a fence may be split across pieces.
            if _fences(self._fence_tail + self._buf.text[:at]) % 2 == (1 if self._in_fence else 0):
                break
            start = at + len(CALL_START)  # inside a code block: that tag is text
        self._content(out, self._buf.take(at)[0], before_call=True)
        self._buf.take(len(CALL_START))
        self._call = _CallScanner()
        return True

    def _content(self, out: list[ChoiceEvent], text: str, *, before_call: bool = False) -> None:
        if not text:
            if before_call:
                self._held_ws = ""
            return
        seen = self._fence_tail + text
        if _fences(seen) % 2:
            self._in_fence = not self._in_fence
        self._fence_tail = seen[-(len(FENCE) - 1) :]
        if not self._content_started or self._calls:
            # Whitespace alone between calls, or before the first one, is layout.
            stripped = text.lstrip(_WS)
            if not stripped:
                if not before_call:
                    self._held_ws += text
                else:
                    self._held_ws = ""
                return
            text = self._held_ws + text
            self._held_ws = ""
            self._content_started = True
        out.append(ContentDelta(self._index, text))

    # -- a call ----------------------------------------------------------------------------------------

    def _scan_call(self, out: list[ChoiceEvent]) -> bool:
        call = self._call
        assert call is not None
        at, safe = self._buf.find(self._end)
        body_end = at if at >= 0 else safe
        call.push(self._buf.take(body_end)[0])
        if not call.broken:
            self._emit(out, call)
        if call.broken and not call.committed:
            # Not a call after all: its text (and the rest of it, up to the end tag) is content.
            self._call = None
            self._content(out, CALL_START + call.body)
            return True
        if at < 0:
            return False
        self._buf.take(len(CALL_END))
        if not call.committed:
            self._call = None
            self._content(out, CALL_START + call.body + CALL_END)
            return True
        self._call = None
        if not self._parallel:
            self._done = True
        return True

    def _emit(self, out: list[ChoiceEvent], call: _CallScanner) -> None:
        if not call.committed and call.ready:
            call.committed = True
            call.id = new_call_id()
            call.index = self._calls
            self._calls += 1
            # The first delta: id, name and whatever of the arguments is already written.
            out.append(ToolCallDelta(self._index, call.index, call.id, call.name, call.take_arguments()))
            return
        if call.committed:
            piece = call.take_arguments()
            if piece:
                out.append(ToolCallDelta(self._index, call.index, None, None, piece))


def _fences(text: str) -> int:
    return text.count(FENCE)


class _CallScanner:
    """Follows the body of one call, ``{"name": ..., "arguments": ...}``, as it arrives.

    :attr:`ready` once the name is known and the arguments have begun (or the object closed without
    any: ``{}``); :meth:`take_arguments` then hands out the arguments' raw text written since the last
    call. :attr:`broken` when the text stops looking like a call.
    """

    def __init__(self) -> None:
        self.body = ""
        self.pos = 0
        self.state = "open"  # open -> key -> colon -> value -> next -> closed
        self.key: str | None = None
        self.name: str | None = None
        self.broken = False
        self.committed = False
        self.id = ""
        self.index = 0
        self.args_raw = ""  # raw text of the arguments value so far
        self.args_done = False
        self.args_string = False  # the arguments were written as a JSON string
        self._args_sent = 0
        self._value: _ValueScanner | None = None

    @property
    def ready(self) -> bool:
        return self.name is not None and (self.args_raw != "" or self.state == "closed")

    def take_arguments(self) -> str:
        if self.args_string:
            # A JSON-encoded string holds the arguments: sent decoded, once complete.
            if not self.args_done or self._args_sent:
                return ""
            self._args_sent = 1
            try:
                value = json.loads(self.args_raw)
            except (ValueError, RecursionError):
                return self.args_raw
            return value if isinstance(value, str) else self.args_raw
        if self.state == "closed" and not self.args_raw and not self._args_sent:
            self._args_sent = 1
            return "{}"  # a call without arguments takes none: an empty object
        piece = self.args_raw[self._args_sent :]
        self._args_sent = len(self.args_raw)
        return piece

    def push(self, text: str) -> None:
        self.body += text
        while not self.broken and self.pos < len(self.body) and self.state != "closed":
            if not self._step():
                return

    def _step(self) -> bool:
        """Advance over one syntactic element; False when it is not complete yet."""
        body = self.body
        if self.state == "value" and self._value is not None:
            return self._continue_value()
        while self.pos < len(body) and body[self.pos] in _WS:
            self.pos += 1
        if self.pos >= len(body):
            return False
        ch = body[self.pos]
        if self.state == "open":
            return self._expect(ch == "{", "key")
        if self.state == "key":
            if ch == "}" and self.key is None:
                return self._expect(True, "closed")
            end = _string_end(body, self.pos)
            if end is None:
                return self._incomplete(ch == '"')
            self.key = _decode(body[self.pos : end])
            self.pos = end
            self.state = "colon" if self.key is not None else self.state
            self.broken = self.key is None
            return not self.broken
        if self.state == "colon":
            return self._expect(ch == ":", "value")
        if self.state == "value":
            return self._start_value(ch)
        if self.state == "next":
            if ch == ",":
                self.pos += 1
                self.state = "key"
                self.key = None
                return True
            return self._expect(ch == "}", "closed")
        return False

    def _expect(self, ok: bool, state: str) -> bool:
        if not ok:
            self.broken = True
            return False
        self.pos += 1
        self.state = state
        return True

    def _incomplete(self, plausible: bool) -> bool:
        self.broken = not plausible
        return False

    def _start_value(self, ch: str) -> bool:
        if self.key == "name":
            end = _string_end(self.body, self.pos)
            if end is None:
                return self._incomplete(ch == '"')
            name = _decode(self.body[self.pos : end])
            if not name or self.name is not None:
                self.broken = True
                return False
            self.name = name
            self.pos = end
            self.state = "next"
            return True
        if self.key == "arguments":
            if ch not in '{"' or self.args_raw:
                self.broken = True
                return False
            self.args_string = ch == '"'
        self._value = _ValueScanner()
        return self._continue_value()

    def _continue_value(self) -> bool:
        value = self._value
        assert value is not None
        start = self.pos
        self.pos = value.scan(self.body, self.pos)
        if value.bad:
            self.broken = True
            return False
        if self.key == "arguments":
            self.args_raw += self.body[start : self.pos]
        if not value.complete:
            return False
        if self.key == "arguments":
            self.args_done = True
        self._value = None
        self.state = "next"
        return True


class _ValueScanner:
    """Finds where one JSON value ends (strings, escapes and nesting only; decoding is json.loads')."""

    __slots__ = ("bad", "complete", "depth", "escape", "in_string", "scalar", "started")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.started = False
        self.scalar = False  # a bare number / true / false / null
        self.complete = False
        self.bad = False

    def scan(self, text: str, pos: int) -> int:
        """Scan ``text`` from ``pos``; returns the position reached (just past the value if done)."""
        while pos < len(text):
            ch = text[pos]
            if not self.started:
                self.started = True
                if ch == '"':
                    self.in_string = True
                elif ch in "{[":
                    self.depth = 1
                elif ch in "-0123456789tfn":
                    self.scalar = True
                else:
                    self.bad = True
                    return pos
                pos += 1
                continue
            if self.scalar:
                if ch in _WS or ch in ",}]":
                    self.complete = True
                    return pos
                pos += 1
                continue
            pos += 1
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.complete = True
                        return pos
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.complete = True
                    return pos
        return pos


def _string_end(text: str, pos: int) -> int | None:
    """Index just past the JSON string starting at ``pos`` (None: not a string, or not complete)."""
    if pos >= len(text) or text[pos] != '"':
        return None
    i = pos + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i + 1
        i += 1
    return None


def _decode(literal: str) -> str | None:
    try:
        value = json.loads(literal)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, str) else None
