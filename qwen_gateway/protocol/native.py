"""Native DashScope wire schemas: ``/api/v1/services/aigc/{text,multimodal}-generation/generation`` and
``/api/v1/tokenizer`` (reference §1.4, §1.5).

A request is ``{"model", "input": {"messages" | "prompt"}, "parameters": {...}}``. Multimodal content
is a list of single-key objects (``{"text"}``, ``{"image"}``, ``{"video"}``) with optional siblings
(``fps``, ``min_pixels``, ``max_pixels``). Unknown fields are kept, as in compatible mode (the official
SDK adds ``parameters.user_agent``). Ranges are not checked here: the service checks them, as it does
for compatible mode, because both protocols validate into the same internal request.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool


class NativeWireModel(BaseModel):
    """Base of every native request schema: unknown fields are kept, never rejected."""

    model_config = ConfigDict(extra="allow", frozen=True)


class NativeContentIn(NativeWireModel):
    text: str | None = None
    image: str | None = None
    # A frame list or a video file URL.
    video: str | list[str] | None = None
    audio: str | None = None
    fps: float | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None


class NativeFunctionCallIn(NativeWireModel):
    name: str
    arguments: str = ""


class NativeToolCallIn(NativeWireModel):
    id: str = ""
    type: str = "function"
    function: NativeFunctionCallIn
    index: int | None = None


class NativeMessageIn(NativeWireModel):
    role: str
    content: str | list[NativeContentIn] | None = None
    name: str | None = None
    tool_calls: list[NativeToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    partial: StrictBool | None = None


class NativeInputIn(NativeWireModel):
    messages: list[NativeMessageIn] | None = None
    prompt: str | None = None


class NativeParametersIn(NativeWireModel):
    """Every generation control of compatible mode, in its native place and spelling, plus the two
    native-only ones (``result_format``, ``incremental_output``)."""

    result_format: str | None = None
    incremental_output: bool | None = None
    stream: bool | None = None
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
    stop: str | list[str] | list[int] | list[list[int]] | None = None
    tools: list[dict[str, Any]] | None = None
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
    translation_options: dict[str, Any] | None = None


class NativeRequest(NativeWireModel):
    model: str
    input: NativeInputIn
    parameters: NativeParametersIn = NativeParametersIn()


class TokenizerRequest(NativeWireModel):
    model: str
    input: NativeInputIn
    parameters: dict[str, Any] | None = None
