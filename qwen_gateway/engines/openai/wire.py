"""The upstream's wire format, both ways: a :class:`GenerationRequest` as an OpenAI-compatible chat
completion body, and the upstream's streamed chunks (or its whole answer) as our engine events.

These dicts are this engine's private business (engines never import ``qwen_gateway.protocol``): they
are built field by field from the internal request, so nothing a client sent reaches the upstream
unless it was first parsed into a :class:`GenerationRequest` field (no ``base_url``, ``api_base``,
extra headers or ``chat_template`` can be smuggled through).

Shapes read (see tests/unit/engines/data/upstream/ for recorded examples):
- reasoning as ``delta.reasoning_content`` (vLLM < 0.17, SGLang, DashScope) or ``delta.reasoning``
  (vLLM >= 0.17, Ollama);
- tool-call deltas with or without ``index`` (Ollama sends each call whole, older versions without an
  index) and with ``id``/``name`` repeated on later deltas by some servers: normalised so ``index`` is
  always there and ``id``/``name`` come only on a call's first delta;
- usage on a last chunk with empty ``choices`` (``stream_options.include_usage``), or none at all.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from qwen_gateway.engines.base import (
    ChatMessage,
    ChoiceConstraint,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    ImagePart,
    JsonConstraint,
    ReasoningTextDelta,
    RegexConstraint,
    TextDelta,
    TextPart,
    ToolCallChunk,
    ToolCallConstraint,
    Usage,
    VideoPart,
)


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one kind of upstream takes what OpenAI's API has no field for."""

    # DashScope takes enable_thinking / thinking_budget / partial as its own top-level fields; vLLM and
    # SGLang take the chat template's switches in chat_template_kwargs and continue_final_message.
    dashscope: bool = False
    thinking_budget: bool = False


def data_url(data: bytes, mime_type: str) -> str:
    """Media the gateway already fetched and checked, inlined: the upstream never fetches a URL."""
    return f"data:{mime_type};base64,{base64.b64encode(data).decode('ascii')}"


def _content(message: ChatMessage, dialect: Dialect) -> str | list[dict[str, Any]]:
    if isinstance(message.content, str):
        return message.content
    parts: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, TextPart):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            image: dict[str, Any] = {"url": data_url(part.data, part.mime_type)}
            for name in ("min_pixels", "max_pixels"):
                value = getattr(part, name)
                if value is not None:
                    # DashScope takes the bounds per image; OpenAI's API and vLLM's have no such field.
                    if not dialect.dashscope:
                        raise UnsupportedField(f"image_url.{name}")
                    image[name] = value
            parts.append({"type": "image_url", "image_url": image})
        elif isinstance(part, VideoPart):
            # A frame list, as DashScope's compatible mode takes a video of images.
            frames = [data_url(f, part.mime_type) for f in part.frames]
            parts.append({"type": "video", "video": frames})
    return parts


def _message(message: ChatMessage, dialect: Dialect) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": _content(message, dialect)}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.partial and dialect.dashscope:
        out["partial"] = True
    return out


def max_tokens_asked(request: GenerationRequest, dialect: Dialect) -> int:
    """The upstream's ``max_tokens`` for ``request`` before the context is considered: our
    ``max_tokens`` caps the answer only, an OpenAI-style one caps reasoning and answer together, so a
    thinking request adds its budget (DashScope's own max_tokens caps the answer, as ours does)."""
    asked = request.sampling.max_tokens
    thinking = request.thinking
    if not dialect.dashscope and thinking is not None and thinking.enabled and thinking.budget is not None:
        asked += thinking.budget
    return asked


def request_body(
    request: GenerationRequest, model: str, dialect: Dialect, *, room: int | None = None
) -> dict[str, Any]:
    """The upstream's chat-completion body for ``request``: streamed with usage always asked for
    (billing must not depend on what the client asked), or, for a caller that only wants the whole
    answer (``request.stream`` false), one non-streamed answer, which always carries its usage
    (``stream_options`` is refused there by vLLM and OpenAI's API).

    ``room``: the tokens the context leaves after the prompt, when the engine counted it; ``max_tokens``
    is cut to it (vLLM refuses a prompt plus max_tokens over its max_model_len; the local engines end
    such an answer with "length" instead, and so does the upstream now)."""
    sampling = request.sampling
    asked = max_tokens_asked(request, dialect)
    body: dict[str, Any] = {
        "model": model,
        "messages": [_message(m, dialect) for m in request.messages],
        "stream": request.stream,
        "max_tokens": asked if room is None else max(1, min(asked, room)),
    }
    if request.stream:
        body["stream_options"] = {"include_usage": True}
    optional = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        # Not in OpenAI's API; vLLM, SGLang and DashScope take them as top-level extras.
        "top_k": sampling.top_k,
        "repetition_penalty": sampling.repetition_penalty,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description is not None else {}),
                    "parameters": dict(t.parameters),
                },
            }
            for t in request.tools
        ]
    if request.media.high_resolution:
        if not dialect.dashscope:
            raise UnsupportedField("vl_high_resolution_images")
        body["vl_high_resolution_images"] = True
    _constraint(body, request)
    _thinking(body, request, dialect)
    if request.messages and request.messages[-1].partial and not dialect.dashscope:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return body


def _constraint(body: dict[str, Any], request: GenerationRequest) -> None:
    constraint = request.constraint
    if constraint is None:
        return
    if isinstance(constraint, JsonConstraint):
        if constraint.schema is None:
            body["response_format"] = {"type": "json_object"}
        else:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": dict(constraint.schema)},
            }
    elif isinstance(constraint, ToolCallConstraint):
        body["tool_choice"] = (
            "required"
            if constraint.name is None
            else {"type": "function", "function": {"name": constraint.name}}
        )
    elif isinstance(constraint, (RegexConstraint, ChoiceConstraint)):  # pragma: no cover
        # Not declared in Capabilities.constraints: the service refuses them before we get here.
        raise AssertionError(f"constraint {constraint!r} is not supported upstream")


def _thinking(body: dict[str, Any], request: GenerationRequest, dialect: Dialect) -> None:
    thinking = request.thinking
    if thinking is None:
        return
    budget = thinking.budget if thinking.enabled and dialect.thinking_budget else None
    if dialect.dashscope:
        body["enable_thinking"] = thinking.enabled
        if budget is not None:
            body["thinking_budget"] = budget
        return
    kwargs: dict[str, Any] = {"enable_thinking": thinking.enabled}
    if budget is not None:
        kwargs["thinking_budget"] = budget
    body["chat_template_kwargs"] = kwargs


# ---------------------------------------------------------------------------------------------------
# Stream chunks -> events
# ---------------------------------------------------------------------------------------------------

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


class UnsupportedField(Exception):
    """The request sets something this upstream has no field for (``param`` names it): refused,
    never dropped silently."""

    def __init__(self, param: str) -> None:
        super().__init__(param)
        self.param = param


class UpstreamProtocolError(Exception):
    """The upstream sent something that is not a chat-completion chunk (the message is for the log)."""


@dataclass(slots=True)
class _Call:
    id_sent: bool = False
    name_sent: bool = False


@dataclass(slots=True)
class ChunkReader:
    """One upstream stream's chunks turned into events, with what is needed to bill it: the usage the
    upstream reported (if any) and the text it delivered (to count when it reported none)."""

    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    delivered: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)  # the reasoning part of ``delivered``
    _calls: dict[int, _Call] = field(default_factory=dict)
    _by_id: dict[str, int] = field(default_factory=dict)
    _last_call: int = -1

    def feed(self, chunk: Any) -> list[GenerationEvent]:
        """Events for one parsed ``data:`` payload."""
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError(f"chunk is not an object: {chunk!r:.200}")
        if "error" in chunk:
            raise UpstreamProtocolError(f"upstream error in stream: {chunk['error']!r:.500}")
        if isinstance(chunk.get("usage"), dict):
            self.usage = _usage(chunk["usage"])
        choices = chunk.get("choices")
        if not choices:
            return []
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise UpstreamProtocolError(f"choices is not a list of objects: {choices!r:.200}")
        choice = choices[0]
        out: list[GenerationEvent] = []
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise UpstreamProtocolError(f"delta is not an object: {delta!r:.200}")
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            self.delivered.append(reasoning)
            self.reasoning.append(reasoning)
            out.append(ReasoningTextDelta(reasoning))
        content = delta.get("content")
        if isinstance(content, str) and content:
            self.delivered.append(content)
            out.append(TextDelta(content))
        for call in delta.get("tool_calls") or ():
            out.append(self._tool_call(call))
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self.finish_reason = _FINISH.get(reason, "stop")
            if self._calls and self.finish_reason == "stop":
                self.finish_reason = "tool_calls"  # older Ollama says "stop" after calling tools
        return out

    def answer(self, body: Any) -> list[GenerationEvent]:
        """Events for a whole (non-streamed) chat completion: its message read as one delta, so the
        same translation applies (``reasoning`` or ``reasoning_content``, tool calls normalised, the
        finish reason, usage); a whole answer's tool calls are numbered by their position."""
        if not isinstance(body, dict):
            raise UpstreamProtocolError(f"answer is not an object: {body!r:.200}")
        if "error" in body:
            raise UpstreamProtocolError(f"upstream error in answer: {body['error']!r:.500}")
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise UpstreamProtocolError(f"choices is not a list of objects: {choices!r:.200}")
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise UpstreamProtocolError(f"message is not an object: {message!r:.200}")
        calls = message.get("tool_calls")
        if calls and isinstance(calls, list):
            numbered = [{**c, "index": i} if isinstance(c, dict) else c for i, c in enumerate(calls)]
            message = {**message, "tool_calls": numbered}
        delta = {"delta": message, "finish_reason": choice.get("finish_reason")}
        return self.feed({"choices": [delta], "usage": body.get("usage")})

    def _tool_call(self, call: Any) -> ToolCallChunk:
        if not isinstance(call, dict):
            raise UpstreamProtocolError(f"tool call delta is not an object: {call!r:.200}")
        function = call.get("function") or {}
        call_id = call.get("id") or None
        index = call.get("index")
        if not isinstance(index, int):
            # No index (Ollama before 0.12 sent each call whole without one): a new id is a new call,
            # a delta without an id continues the last call.
            if call_id is not None and call_id in self._by_id:
                index = self._by_id[call_id]
            elif call_id is not None or self._last_call < 0:
                index = self._last_call + 1
            else:
                index = self._last_call
        state = self._calls.setdefault(index, _Call())
        self._last_call = max(self._last_call, index)
        if call_id is not None:
            self._by_id.setdefault(call_id, index)
        name = function.get("name") or None
        arguments = function.get("arguments") or ""
        if not isinstance(arguments, str):  # a few servers send the arguments as an object
            arguments = json.dumps(arguments, ensure_ascii=False)
        out = ToolCallChunk(
            call_index=index,
            id=None if state.id_sent else (call_id or f"call_{index}"),
            name=None if state.name_sent else name,
            arguments=arguments,
        )
        state.id_sent = True
        state.name_sent = state.name_sent or name is not None
        self.delivered.append((name or "") + arguments)
        return out


def _usage(raw: dict[str, Any]) -> Usage:
    def num(d: Any, key: str) -> int:
        value = d.get(key) if isinstance(d, dict) else None
        return value if isinstance(value, int) and value >= 0 else 0

    return Usage(
        prompt_tokens=num(raw, "prompt_tokens"),
        completion_tokens=num(raw, "completion_tokens"),
        reasoning_tokens=num(raw.get("completion_tokens_details"), "reasoning_tokens"),
        cached_tokens=num(raw.get("prompt_tokens_details"), "cached_tokens"),
    )
