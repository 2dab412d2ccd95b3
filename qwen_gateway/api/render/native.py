"""Native DashScope rendering: the only module that knows native response, event and error shapes.

Shapes follow the captures (reference §1.5, §4.2, §5.1; ``captures/single-generation-*``):

- non-stream: ``{"output": {...}, "usage": {...}, "request_id"}``; ``output`` is ``{"finish_reason",
  "text"}`` for ``result_format`` text, ``{"choices": [{"finish_reason", "message"}]}`` for message
  (the multimodal endpoint's ``message.content`` is a list of ``{"text"}`` objects);
- stream: one SSE event per engine step, ``id:N`` / ``event:result`` / ``:HTTP_STATUS/200`` /
  ``data:{...}``, ``finish_reason`` the string ``"null"`` until the last event, the cumulative usage in
  every event, no ``[DONE]``; with ``incremental_output`` false every event repeats the whole text so
  far; a failure is one ``event:error`` whose data is the error body;
- errors: flat ``{"code", "message", "request_id"}`` with the native code.

Web search (``ChatCall.search_info``, service/search.py): with ``enable_source`` the results are
``output.search_info`` (``{"search_results": [{"icon", "index", "site_name", "title", "url"}],
"extra_tool_info": []}``, as in captures/*search*); every search that ran is counted in
``usage.plugins.search`` (``{"count", "strategy"}``), sources asked for or not. Streamed, the results
ride on the first event and later events carry empty lists (captures: single-generation-message-search-
sse), except with ``incremental_output`` false, where every event repeats the whole output so far,
results included; ``prepend_search_result`` sends them first in an event of their own with
``"usage": {}``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any, assert_never

import orjson

from qwen_gateway.api.render.compat import logprobs_body
from qwen_gateway.engines.base import TokenLogprob, Usage
from qwen_gateway.errors import ApiError, AuthenticationError, EngineFailure, ModelNotFound
from qwen_gateway.service.events import (
    ChatResult,
    ChoiceEvent,
    ChoiceFinished,
    ChoiceResult,
    ContentDelta,
    ReasoningDelta,
    StreamFailed,
    ToolCallDelta,
    UsageProgress,
    UsageReport,
)
from qwen_gateway.service.requests.native import NativeCall
from qwen_gateway.service.tokenize import Tokenization

log = logging.getLogger(__name__)

# DashScope's native texts where they differ from compatible mode's (captures: auth-error-nosse).
# An unknown model is "Model not exist." natively (reference §5.2, FastGPT#1618).
NATIVE_MESSAGES: dict[type[ApiError], str] = {
    AuthenticationError: "Invalid API-key provided.",
    ModelNotFound: "Model not exist.",
}
STILL_GOING = "null"  # finish_reason of every event but the last: the string, as DashScope sends it


# -- errors ------------------------------------------------------------------------------------------

# Where the native protocol lives; errors on these paths are answered in its shape.
NATIVE_PREFIX = "/api/v1/"
SSE_MEDIA_TYPE = "text/event-stream;charset=UTF-8"


def wants_sse(headers: Mapping[str, str]) -> bool:
    """DashScope streams when ``X-DashScope-SSE: enable`` (the SDK also sends the Accept header)."""
    if headers.get("x-dashscope-sse", "").strip().lower() == "enable":
        return True
    return "text/event-stream" in headers.get("accept", "").lower()


def error_body(exc: ApiError, request_id: str | None) -> dict[str, Any]:
    """The native error body (the native gateway adds the request id to every error, the bad-key one
    included, unlike compatible mode)."""
    message = NATIVE_MESSAGES.get(type(exc), exc.message)
    body: dict[str, Any] = {"code": exc.native_code, "message": message}
    if request_id:
        body["request_id"] = request_id
    return body


def plain_error_body(code: str, message: str, request_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if request_id:
        body["request_id"] = request_id
    return body


def sse_event(number: int, data: dict[str, Any], *, event: str = "result", status: int = 200) -> bytes:
    """One native SSE event: single-line JSON, the status as a comment line (what DashScope sends)."""
    return (
        b"id:%d\nevent:%s\n:HTTP_STATUS/%d\ndata:" % (number, event.encode(), status)
        + orjson.dumps(data)
        + b"\n\n"
    )


def error_event(exc: ApiError, request_id: str | None, number: int = 1) -> bytes:
    return sse_event(number, error_body(exc, request_id), event="error", status=exc.status)


# -- shared pieces -----------------------------------------------------------------------------------


def usage_body(usage: Usage) -> dict[str, Any]:
    """Native usage (reference §4.2): input/output/total, the reasoning split, the media split."""
    body: dict[str, Any] = {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.reasoning_tokens:
        body["output_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    if usage.image_tokens or usage.video_tokens:
        details = {"text_tokens": usage.prompt_tokens - usage.image_tokens - usage.video_tokens}
        for name in ("image_tokens", "video_tokens"):
            count = getattr(usage, name)
            if count:
                body[name] = count
                details[name] = count
        body["input_tokens_details"] = details
    return body


@dataclass(slots=True)
class _Choice:
    """What one choice has said so far (for non-incremental events and the final body)."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    # call index -> [id, name, arguments so far]
    calls: dict[int, list[str]] = field(default_factory=dict)
    finish: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


def _tool_calls(calls: dict[int, list[str]]) -> list[dict[str, Any]]:
    return [
        {"index": i, "id": c[0], "type": "function", "function": {"name": c[1], "arguments": c[2]}}
        for i, c in sorted(calls.items())
    ]


def _message(
    call: NativeCall, content: str, reasoning: str | None, tools: list[dict[str, Any]]
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": [{"text": content}] if call.multimodal else content,
    }
    if reasoning is not None or call.chat.thinking:
        message["reasoning_content"] = reasoning or ""
    if tools:
        message["tool_calls"] = tools
    return message


def _output(call: NativeCall, choices: list[dict[str, Any]], finish: str) -> dict[str, Any]:
    output: dict[str, Any] = {"choices": choices}
    if call.chat.model.spec.family == "qwen-mt":
        # Qwen-MT's answer also names its model and finish beside the choices (captures: translation).
        output = {"finish_reason": finish, "model_name": call.chat.model.id, **output}
    return output


def search_info_body(call: NativeCall, *, with_results: bool = True) -> dict[str, Any] | None:
    """``output.search_info`` (None: no search ran or ``enable_source`` is off)."""
    info = call.chat.search_info
    if info is None or not info.enable_source:
        return None
    results = [
        {"icon": r.icon, "index": r.index, "site_name": r.site_name, "title": r.title, "url": r.url}
        for r in info.results
    ]
    return {"extra_tool_info": [], "search_results": results if with_results else []}


def _with_plugins(usage: dict[str, Any], call: NativeCall) -> dict[str, Any]:
    """``usage.plugins``: the searches that ran for the request (what DashScope bills apart)."""
    info = call.chat.search_info
    if info is not None and info.count:
        usage["plugins"] = {"search": {"count": info.count, "strategy": info.strategy}}
    return usage


def tokenizer_body(result: Tokenization, request_id: str) -> dict[str, Any]:
    """``POST /api/v1/tokenizer`` (captures: tokenization-nosse)."""
    return {
        "output": {"token_ids": list(result.token_ids), "tokens": list(result.tokens)},
        "usage": {"input_tokens": len(result.token_ids)},
        "request_id": request_id,
    }


# -- non-stream --------------------------------------------------------------------------------------


def response_body(
    call: NativeCall, result: ChatResult, output_extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    usage = _with_plugins(usage_body(result.usage), call)
    if call.result_format == "text":
        choice = result.choices[0]
        output: dict[str, Any] = {"finish_reason": choice.finish_reason or "stop", "text": choice.text}
    else:
        output = _output(call, [_choice_body(call, c) for c in result.choices], _finish(result.choices[0]))
    search_info = search_info_body(call)
    if search_info is not None:
        output["search_info"] = search_info
    if output_extra:
        output.update(output_extra)
    return {"output": output, "usage": usage, "request_id": call.chat.request_id}


def _finish(choice: ChoiceResult) -> str:
    return choice.finish_reason or "stop"


def _choice_body(call: NativeCall, choice: ChoiceResult) -> dict[str, Any]:
    tools = [
        {
            "index": i,
            "id": tc.id,
            "type": "function",
            "function": {"name": tc.name, "arguments": tc.arguments},
        }
        for i, tc in enumerate(choice.tool_calls)
    ]
    body: dict[str, Any] = {
        "finish_reason": _finish(choice),
        "message": _message(call, choice.text, choice.reasoning_text, tools),
    }
    if call.chat.n > 1:
        body["index"] = choice.index
    if choice.logprobs is not None:
        body["logprobs"] = logprobs_body(choice.logprobs)
    return body


# -- stream ------------------------------------------------------------------------------------------


class StreamRenderer:
    """Choice events of one call -> native event payloads (the ``data`` of each SSE event)."""

    def __init__(self, call: NativeCall) -> None:
        self._call = call
        self._usage = Usage(0, 0)
        self._choices = [_Choice() for _ in range(call.chat.n)]
        # The search results went out already (in a prepended event or the first one).
        self._results_sent = False

    def prepended(self) -> dict[str, Any] | None:
        """The event ``prepend_search_result`` puts before the answer: the results alone, an empty
        assistant message and ``"usage": {}`` (captures: single-generation-message-search-sse)."""
        search_info = search_info_body(self._call)
        if not self._call.chat.search_options.prepend or search_info is None:
            return None
        self._results_sent = True
        call = self._call
        output: dict[str, Any]
        if call.result_format == "text":
            output = {"finish_reason": STILL_GOING, "text": ""}
        else:
            message = _message(call, "", None, [])
            output = _output(call, [{"message": message, "finish_reason": STILL_GOING}], STILL_GOING)
        output["search_info"] = search_info
        return {"output": output, "usage": {}, "request_id": self._call.chat.request_id}

    def extra_output(self) -> dict[str, Any]:
        """Fields added to ``output`` of every event: ``search_info`` (the results once, or in every
        event when each repeats the whole output)."""
        with_results = not self._results_sent or not self._call.incremental
        search_info = search_info_body(self._call, with_results=with_results)
        if search_info is None:
            return {}
        self._results_sent = True
        return {"search_info": search_info}

    def _payload(self, index: int, delta: _Choice, finish: str) -> dict[str, Any]:
        call = self._call
        seen = delta if call.incremental else self._choices[index]
        content = "".join(seen.content)
        if call.result_format == "text":
            output: dict[str, Any] = {"finish_reason": finish, "text": content}
        else:
            reasoning = "".join(seen.reasoning) if (seen.reasoning or call.chat.thinking) else None
            choice: dict[str, Any] = {
                "message": _message(call, content, reasoning, _tool_calls(seen.calls)),
                "finish_reason": finish,
            }
            if call.chat.n > 1:
                choice["index"] = index
            if call.chat.generation.sampling.logprobs is not None:
                choice["logprobs"] = logprobs_body(seen.logprobs)
            output = _output(call, [choice], finish)
        output.update(self.extra_output())
        usage = _with_plugins(usage_body(self._usage), call)
        return {"output": output, "usage": usage, "request_id": call.chat.request_id}

    def render(self, event: ChoiceEvent) -> list[dict[str, Any]]:
        """The payloads ``event`` adds (none for a usage update or a finish, which the end reports)."""
        delta = _Choice()
        match event:
            case UsageProgress():
                self._usage = event.usage
                return []
            case ContentDelta():
                if not event.text and not event.logprobs:
                    return []
                delta.content.append(event.text)
                delta.logprobs.extend(event.logprobs)
                self._choices[event.index].content.append(event.text)
                self._choices[event.index].logprobs.extend(event.logprobs)
            case ReasoningDelta():
                delta.reasoning.append(event.text)
                self._choices[event.index].reasoning.append(event.text)
            case ToolCallDelta():
                calls = self._choices[event.index].calls
                known = calls.setdefault(event.call_index, [event.id or "", event.name or "", ""])
                known[2] += event.arguments
                # Continuation pieces carry "id": "" (reference §3.6) and the name only once.
                delta.calls[event.call_index] = [event.id or "", event.name or "", event.arguments]
            case ChoiceFinished():
                self._choices[event.index].finish = event.reason
                return []
            case UsageReport():
                self._usage = event.usage
                # The last event of each choice: nothing new said, its finish_reason and the total.
                return [self._payload(i, _Choice(), c.finish or "stop") for i, c in enumerate(self._choices)]
            case StreamFailed():
                raise AssertionError("failures are framed by sse_frames")  # pragma: no cover
            case _:
                assert_never(event)
        index = event.index
        return [self._payload(index, delta, STILL_GOING)]


async def sse_frames(
    call: NativeCall, events: AsyncGenerator[ChoiceEvent, None]
) -> AsyncGenerator[bytes, None]:
    """The whole native SSE body of a stream (no ``[DONE]``: the last event's finish_reason ends it)."""
    renderer = StreamRenderer(call)
    number = 0
    first = True
    request_id = call.chat.request_id
    try:
        async for event in events:
            if first and not isinstance(event, StreamFailed):
                first = False
                prepended = renderer.prepended()
                if prepended is not None:
                    number += 1
                    yield sse_event(number, prepended)
            if isinstance(event, StreamFailed):
                number += 1
                yield error_event(event.error, request_id, number)
                break
            for payload in renderer.render(event):
                number += 1
                yield sse_event(number, payload)
    except Exception as exc:  # a bug of ours after the headers: still end the stream in-band
        log.error("rendering the stream of request %s failed", request_id, exc_info=exc)
        yield error_event(EngineFailure(), request_id, number + 1)
    finally:
        # Closing the events settles the request (its ledger row) before the client sees the end.
        await events.aclose()
