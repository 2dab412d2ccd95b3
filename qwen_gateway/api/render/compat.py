"""Compatible-mode (OpenAI-style) rendering: the only module that knows compatible-mode response,
chunk and error shapes.

Shapes follow DashScope's output (seeds/002, reference §2-§5). Two deliberate differences from its raw
bytes, so every answer also validates against OpenAI's published schema: ``system_fingerprint`` is
omitted (DashScope sends ``null``; the schema allows only a string, and SDKs fill in ``None`` either way)
and the message carries ``"refusal": null`` (required by the schema; DashScope's SDK output shows it too).

Stream order, per DashScope: one role chunk per choice once the first event is known, content (or
reasoning / tool-call) deltas, one finish chunk per choice, the usage chunk when
``stream_options.include_usage`` asked for it, then ``data: [DONE]``. A failure after the headers went
out is one in-band error object, then ``data: [DONE]``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any, assert_never

import orjson

from qwen_gateway.engines.base import FinishReason, TokenLogprob, Usage
from qwen_gateway.errors import ApiError, EngineFailure
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
from qwen_gateway.service.validation import ChatCall

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def sse_data(item: dict[str, Any]) -> bytes:
    """One ``data:`` line of single-line JSON (the DashScope SDK parses streams line by line)."""
    return b"data: " + orjson.dumps(item) + b"\n\n"


# -- errors ------------------------------------------------------------------------------------------


def error_body(
    *, message: str, type_: str, code: str | None, param: str | None, request_id: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def api_error_body(exc: ApiError, request_id: str | None) -> dict[str, Any]:
    return error_body(
        message=exc.message,
        type_=exc.type,
        code=exc.code,
        param=exc.param,
        request_id=request_id if exc.include_request_id else None,
    )


# -- shared pieces -----------------------------------------------------------------------------------


def usage_body(usage: Usage) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.reasoning_tokens:
        body["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    if usage.image_tokens or usage.video_tokens:
        # DashScope's split of the prompt (its native input_tokens_details); prompt_tokens includes both.
        details: dict[str, int] = {
            "text_tokens": usage.prompt_tokens - usage.image_tokens - usage.video_tokens
        }
        if usage.image_tokens:
            details["image_tokens"] = usage.image_tokens
        if usage.video_tokens:
            details["video_tokens"] = usage.video_tokens
        body["prompt_tokens_details"] = details
    return body


def model_body(*, model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def model_list_body(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": models}


# -- non-stream --------------------------------------------------------------------------------------


def completion_body(call: ChatCall, result: ChatResult) -> dict[str, Any]:
    return {
        "choices": [_choice(c, call.thinking) for c in result.choices],
        "object": "chat.completion",
        "usage": usage_body(result.usage),
        "created": call.created,
        "model": call.model.id,
        "id": call.completion_id,
    }


def _choice(choice: ChoiceResult, thinking: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
    reasoning = choice.reasoning_text
    if reasoning is not None or thinking:
        message["reasoning_content"] = reasoning or ""
    if choice.tool_calls:
        message["tool_calls"] = [
            {
                "id": tc.id,
                "type": "function",
                "function": {"name": tc.name, "arguments": tc.arguments},
                "index": i,
            }
            for i, tc in enumerate(choice.tool_calls)
        ]
    return {
        "message": message,
        "finish_reason": choice.finish_reason or "stop",
        "index": choice.index,
        "logprobs": logprobs_body(choice.logprobs) if choice.logprobs is not None else None,
    }


def logprobs_body(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's ``choices[].logprobs``: one entry per answer token with its top alternatives."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.bytes),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


# -- stream ------------------------------------------------------------------------------------------


class StreamRenderer:
    """Choice events of one call -> compatible-mode chunk dicts."""

    def __init__(self, call: ChatCall) -> None:
        self._call = call
        self._id = call.completion_id
        self._created = call.created
        self._model = call.model.id

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "choices": choices,
            "object": "chat.completion.chunk",
            "usage": usage,
            "created": self._created,
            "model": self._model,
            "id": self._id,
        }

    @staticmethod
    def _delta(index: int, delta: dict[str, Any], finish: FinishReason | None = None) -> dict[str, Any]:
        return {"delta": delta, "finish_reason": finish, "index": index, "logprobs": None}

    def start(self) -> list[dict[str, Any]]:
        """The role chunk of every choice."""
        if self._call.thinking:
            delta: dict[str, Any] = {"content": None, "role": "assistant", "reasoning_content": ""}
        else:
            delta = {"content": "", "role": "assistant"}
        return [self._chunk([self._delta(i, dict(delta))]) for i in range(self._call.n)]

    def render(self, event: ChoiceEvent) -> list[dict[str, Any]]:
        match event:
            case ContentDelta():
                choice = self._delta(event.index, {"content": event.text})
                if event.logprobs:
                    choice["logprobs"] = logprobs_body(event.logprobs)
                return [self._chunk([choice])]
            case ReasoningDelta():
                delta = {"content": None, "reasoning_content": event.text}
                return [self._chunk([self._delta(event.index, delta)])]
            case ToolCallDelta():
                # DashScope's shape: later pieces of a call carry "id": "" and the type, never a name.
                function: dict[str, Any] = {"arguments": event.arguments}
                call: dict[str, Any] = {"index": event.call_index, "id": event.id or "", "type": "function"}
                call["function"] = function
                if event.name is not None:
                    function["name"] = event.name
                tool_delta: dict[str, Any] = {"content": None, "tool_calls": [call]}
                return [self._chunk([self._delta(event.index, tool_delta)])]
            case ChoiceFinished():
                finish: dict[str, Any] = {"content": ""}
                if event.reason == "tool_calls":
                    finish = {}  # DashScope ends a tool-call stream with an empty delta
                elif self._call.thinking:
                    finish["reasoning_content"] = None
                return [self._chunk([self._delta(event.index, finish, event.reason)])]
            case UsageProgress():
                return []  # compatible mode reports usage once, at the end
            case UsageReport():
                if not self._call.include_usage:
                    return []
                return [self._chunk([], usage_body(event.usage))]
            case StreamFailed():
                # In-band errors always carry the request id: it is the client's only handle on them.
                exc = event.error
                body = error_body(
                    message=exc.message,
                    type_=exc.type,
                    code=exc.code,
                    param=exc.param,
                    request_id=self._call.request_id,
                )
                # What the failed request is charged, when the client asked to be told.
                if self._call.include_usage and event.usage is not None:
                    return [self._chunk([], usage_body(event.usage)), body]
                return [body]
            case _:
                assert_never(event)


async def sse_frames(
    call: ChatCall, events: AsyncGenerator[ChoiceEvent, None]
) -> AsyncGenerator[bytes, None]:
    """The whole compatible-mode SSE body of a stream, ``data: [DONE]`` included.

    ``events`` must not start with a :class:`StreamFailed` that the route could still answer with its
    HTTP status (the route checks the first event before the headers go out)."""
    renderer = StreamRenderer(call)
    started = False
    try:
        async for event in events:
            if not started:
                started = True
                if not isinstance(event, StreamFailed):
                    for chunk in renderer.start():
                        yield sse_data(chunk)
            for chunk in renderer.render(event):
                yield sse_data(chunk)
            if isinstance(event, StreamFailed):
                break
    except Exception as exc:  # a bug of ours after the headers: still end the stream in-band
        log.error("rendering the stream of request %s failed", call.request_id, exc_info=exc)
        yield sse_data(renderer.render(StreamFailed(EngineFailure(), before_output=not started))[0])
    finally:
        # Closing the events settles the request (its ledger row) before the client sees the end.
        await events.aclose()
    yield DONE
