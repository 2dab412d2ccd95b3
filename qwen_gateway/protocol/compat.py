"""Compatible-mode (OpenAI-style) wire schemas: ``/compatible-mode/v1/chat/completions`` and ``/models``.

Requests are pydantic models that keep unknown fields (DashScope clients send ``metadata``,
``extra_body`` extensions of later features, ``cache_control`` ...): the extra-field policy is stated once
in :class:`WireModel`. Ranges are *not* checked here: the service checks them against the model's limits
and answers with DashScope's own messages. Responses are plain dicts shaped like DashScope's output (the
seed examples), built by the functions at the bottom so every shape is written in one place.

Two deliberate differences from DashScope's raw bytes, so that every answer also validates against
OpenAI's published schema: ``system_fingerprint`` is omitted (DashScope sends ``null``, the schema only
allows a string; SDKs fill in ``None`` either way) and the message carries ``"refusal": null`` (required
by the schema; DashScope's SDK output shows it too).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

# ---------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------


class WireModel(BaseModel):
    """Base of every request schema: unknown fields are kept, never rejected."""

    model_config = ConfigDict(extra="allow", frozen=True)


class ContentPartIn(WireModel):
    type: str
    text: str | None = None


class FunctionCallIn(WireModel):
    name: str
    arguments: str = ""


class ToolCallIn(WireModel):
    id: str = ""
    type: str = "function"
    function: FunctionCallIn
    index: int | None = None


class MessageIn(WireModel):
    role: str
    content: str | list[ContentPartIn] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    partial: StrictBool | None = None


class FunctionDefIn(WireModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolIn(WireModel):
    type: str = "function"
    function: FunctionDefIn


class StreamOptionsIn(WireModel):
    include_usage: bool | None = None


StopIn = str | list[str] | list[int] | list[list[int]]


class ChatCompletionRequest(WireModel):
    model: str
    messages: list[MessageIn]
    stream: bool | None = None
    stream_options: StreamOptionsIn | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: StopIn | None = None
    tools: list[ToolIn] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    enable_search: bool | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = Field(default=None)


# ---------------------------------------------------------------------------------------------------
# Responses (dicts in DashScope's shape; see seeds/002 and reference §2-§5)
# ---------------------------------------------------------------------------------------------------

FinishReasonOut = Literal["stop", "length", "tool_calls"] | None


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_dict(
    *,
    completion_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any],
) -> dict[str, Any]:
    return {
        "choices": choices,
        "object": "chat.completion",
        "usage": usage,
        "created": created,
        "model": model,
        "id": completion_id,
    }


def choice_dict(*, index: int, content: str, finish_reason: FinishReasonOut) -> dict[str, Any]:
    return {
        "message": {"role": "assistant", "content": content, "refusal": None},
        "finish_reason": finish_reason,
        "index": index,
        "logprobs": None,
    }


def chunk_dict(
    *,
    completion_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "choices": choices,
        "object": "chat.completion.chunk",
        "usage": usage,
        "created": created,
        "model": model,
        "id": completion_id,
    }


def chunk_choice(
    *, index: int, delta: dict[str, Any], finish_reason: FinishReasonOut = None
) -> dict[str, Any]:
    return {"delta": delta, "finish_reason": finish_reason, "index": index, "logprobs": None}


def model_dict(*, model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def model_list_dict(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": models}


def error_dict(
    *, message: str, type_: str, code: str | None, param: str | None, request_id: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    if request_id is not None:
        body["request_id"] = request_id
    return body
