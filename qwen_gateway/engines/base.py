"""What an engine is: the internal request it takes, the events it yields, the interface it implements.

Engines never see wire schemas (``qwen_gateway.protocol``): the service layer turns a wire request into
one frozen :class:`GenerationRequest`, and turns the engine's :data:`GenerationEvent` stream back into
wire chunks. One :class:`GenerationRequest` is one sequence; the service fans out ``n > 1``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

# ---------------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


# Later issues add ImagePart / VideoPart / AudioPart (resolved media, never raw URLs for the engine).
ContentPart = TextPart


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, exactly as the model produced it


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: str | tuple[ContentPart, ...]
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    # True on a final assistant message the model must continue (DashScope "partial mode").
    partial: bool = False

    def text(self) -> str:
        """The message's text, parts joined (text-only engines use this)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str | None
    parameters: Mapping[str, Any]  # JSON schema, passed to the chat template as-is


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling controls. ``None`` means "the checkpoint's own default" (its generation_config)."""

    max_tokens: int
    temperature: float | None = None  # 0 -> greedy
    top_p: float | None = None
    top_k: int | None = None  # None -> the checkpoint default; 0 -> top-k filtering off
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()  # the stop text is not returned
    stop_token_ids: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end generation


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams
    tools: tuple[ToolSpec, ...] = ()
    # Extra variables for the chat template, e.g. {"enable_thinking": False} for Qwen3.
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """Exactly the tokens fed to the model (the rendered prompt) and the tokens it generated."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New answer text. Never ends inside a UTF-8 character or a possible stop string.

    ``usage`` is the cumulative usage so far when the engine knows it: the native protocol reports it
    on every event, and billing uses the last one seen when a client disconnects mid-stream.
    """

    text: str
    usage: Usage | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every successful generation."""

    reason: FinishReason
    usage: Usage


GenerationEvent = TextDelta | Finished

# ---------------------------------------------------------------------------------------------------
# Engine interface
# ---------------------------------------------------------------------------------------------------


class EngineState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class EngineHealth:
    state: EngineState
    active_generations: int
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an engine can do, declared as data so the service can check before calling it."""

    max_context: int  # prompt + completion tokens the model accepts
    max_output: int | None = None
    vision: bool = False
    video: bool = False
    tools: bool = True
    reasoning: bool = False
    # Whether stop may be given as token ids (a remote engine that only takes strings says False).
    stop_token_ids: bool = True


@runtime_checkable
class Engine(Protocol):
    """One model behind one interface. Implementations live in ``engines/<name>/``.

    Cancellation: the caller closes the iterator returned by :meth:`generate` (``aclose()``, or leaving
    an ``async for`` early); the engine must then stop work on that request promptly.
    """

    name: str

    @property
    def capabilities(self) -> Capabilities: ...

    async def start(self) -> None:
        """Load weights / connect. Raises :class:`qwen_gateway.errors.StartupError` with one line."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Yield :class:`TextDelta` events then exactly one :class:`Finished`.

        Raises :class:`qwen_gateway.errors.ApiError` subclasses (e.g. ``ContextLengthExceeded``) before
        the first event when the request can't run, or ``EngineFailure`` if generation breaks.
        """

    async def health(self) -> EngineHealth:
        """The engine's state and how many generations it is running now."""

    async def aclose(self) -> None:
        """Stop every generation and free the model."""
