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

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

# ---------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------


class WireModel(BaseModel):
    """Base of every request schema: unknown fields are kept, never rejected."""

    model_config = ConfigDict(extra="allow", frozen=True)


class ImageURLIn(WireModel):
    url: str
    # DashScope: per-image pixel bounds of the resize, inside the image_url object (reference §3.2).
    min_pixels: int | None = None
    max_pixels: int | None = None
    # OpenAI's field; DashScope documents none of it (only "auto", i.e. absent, is accepted).
    detail: str | None = None


class VideoURLIn(WireModel):
    url: str


class ContentPartIn(WireModel):
    type: str
    text: str | None = None
    image_url: ImageURLIn | None = None
    # A video as a list of frame URLs ({"type": "video", "video": [...]}), or a video file.
    video: list[str] | None = None
    video_url: VideoURLIn | None = None
    # Frames per second: of a frame list (how fast it was taken) or to sample a video file at.
    fps: float | None = None


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
    search_options: dict[str, Any] | None = None
    vl_high_resolution_images: bool | None = None
    ocr_options: dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = Field(default=None)
