"""Qwen3-Coder's XML-style tool calls, as its chat template teaches them::

    <tool_call>
    <function=get_current_weather>
    <parameter=location>
    杭州市
    </parameter>
    </function>
    </tool_call>

A parameter's value is text: the template writes strings as they are and other values as JSON, so
the tool's schema decides how it is read back (a ``string`` parameter stays text, ``"42"`` included;
anything else is ``json.loads``-ed, and kept as text if that fails). Never evaluated as code.

Streaming: the first delta of a call (id, name, ``{``) goes out once ``<function=NAME>`` is complete,
then one delta per complete parameter (``"key": value``), then ``}`` at ``</function>``; the pieces
join to one JSON object. Text that never becomes a ``<function=...>`` is given back as content.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from qwen_gateway.service.events import ChoiceEvent, ContentDelta, ToolCallDelta
from qwen_gateway.service.parsers.base import Buffer, Specials, Tag
from qwen_gateway.service.parsers.hermes import CALL_END, CALL_START, new_call_id

FUNCTION = "<function="
FUNCTION_END = "</function>"
PARAMETER = "<parameter="
PARAMETER_END = "</parameter>"


class Qwen3CoderToolParser:
    """``parameters`` maps each offered tool's name to its JSON schema (for the parameter types)."""

    def __init__(
        self,
        index: int,
        special_tokens: Mapping[str, int],
        *,
        parallel: bool = False,
        text_tags: bool = False,
        parameters: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self._index = index
        tokens = {} if text_tags else special_tokens
        self._start = Tag.of(CALL_START, tokens)
        self._end = Tag.of(CALL_END, tokens)
        self._parallel = parallel
        self._parameters = parameters or {}
        self._buf = Buffer()
        self._in_call = False
        self._body = ""  # the call's text so far (given back as content if it never becomes one)
        self._name: str | None = None
        self._call_index = 0
        self._args = 0  # parameters sent for the current call
        self._cursor = 0  # where in the body the next parameter is looked for
        self._closed = False  # </function> seen
        self._calls = 0
        self._done = False
        self._content_started = False
        self._held_ws = ""

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
            if not self._in_call:
                at, safe = self._buf.find(self._start)
                if at < 0:
                    self._content(out, self._buf.take(safe)[0])
                    break
                self._content(out, self._buf.take(at)[0])
                self._held_ws = ""
                self._buf.take(len(CALL_START))
                self._in_call, self._body, self._name, self._args, self._closed = True, "", None, 0, False
                continue
            at, safe = self._buf.find(self._end)
            self._body += self._buf.take(at if at >= 0 else safe)[0]
            self._scan(out)
            if at < 0:
                break
            self._buf.take(len(CALL_END))
            self._end_call(out)
        return out

    def finish(self) -> list[ChoiceEvent]:
        out: list[ChoiceEvent] = []
        if self._done:
            return out
        rest = self._buf.take(len(self._buf.text))[0]
        if self._in_call:
            self._body += rest
            self._scan(out)
            if self._name is None:
                self._content(out, CALL_START + self._body)
            elif not self._closed:
                self._close(out)
            self._in_call = False
        else:
            self._content(out, rest)
        if self._held_ws and not self._calls:
            out.append(ContentDelta(self._index, self._held_ws))
        self._held_ws = ""
        return out

    def _content(self, out: list[ChoiceEvent], text: str) -> None:
        if not self._content_started or self._calls:
            # Whitespace alone before the first call or between calls is layout: held until text
            # follows (then it is part of it), dropped when a call does.
            if not text.strip():
                self._held_ws += text
                return
            text, self._held_ws = self._held_ws + text, ""
        self._content_started = True
        out.append(ContentDelta(self._index, text))

    def _scan(self, out: list[ChoiceEvent]) -> None:
        """Send what the body now holds completely: the name, then each finished parameter."""
        body = self._body
        if self._name is None:
            start = body.find(FUNCTION)
            end = body.find(">", start + len(FUNCTION)) if start >= 0 else -1
            if end < 0 or body[:start].strip():
                return
            name = body[start + len(FUNCTION) : end].strip()
            if not name:
                return
            self._name = name
            self._cursor = end + 1
            self._call_index = self._calls
            self._calls += 1
            out.append(ToolCallDelta(self._index, self._call_index, new_call_id(), name, "{"))
        while not self._closed:
            at = body.find(PARAMETER, self._cursor)
            stop = body.find(FUNCTION_END, self._cursor)
            if stop >= 0 and (at < 0 or stop < at):
                self._close(out)
                return
            if at < 0:
                return
            key_end = body.find(">", at + len(PARAMETER))
            value_end = body.find(PARAMETER_END, key_end + 1) if key_end >= 0 else -1
            if value_end < 0:
                return
            key = body[at + len(PARAMETER) : key_end].strip()
            value = self._value(key, body[key_end + 1 : value_end])
            piece = (", " if self._args else "") + json.dumps(key, ensure_ascii=False) + ": "
            out.append(ToolCallDelta(self._index, self._call_index, None, None, piece + value))
            self._args += 1
            self._cursor = value_end + len(PARAMETER_END)

    def _value(self, key: str, raw: str) -> str:
        """The JSON text of one parameter's value."""
        text = raw.removeprefix("\n").removesuffix("\n")
        schema = self._parameters.get(self._name or "", {})
        prop = (schema.get("properties") or {}).get(key) if isinstance(schema, Mapping) else None
        kind = prop.get("type") if isinstance(prop, Mapping) else None
        if kind != "string":
            try:
                return json.dumps(json.loads(text), ensure_ascii=False)
            except (ValueError, RecursionError):
                pass
        return json.dumps(text, ensure_ascii=False)

    def _close(self, out: list[ChoiceEvent]) -> None:
        self._closed = True
        out.append(ToolCallDelta(self._index, self._call_index, None, None, "}"))

    def _end_call(self, out: list[ChoiceEvent]) -> None:
        self._in_call = False
        if self._name is None:
            self._content(out, CALL_START + self._body + CALL_END)
            return
        if not self._closed:
            self._close(out)
        if not self._parallel:
            self._done = True
