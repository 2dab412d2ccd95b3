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


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image already fetched and checked by ``media/`` (never a URL): its encoded bytes.

    ``min_pixels``/``max_pixels`` bound the resize the engine applies before counting image tokens
    (DashScope's ``vl_high_resolution_images`` and per-part limits map here)."""

    data: bytes
    mime_type: str
    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass(frozen=True, slots=True)
class VideoPart:
    """A video as decoded frames (encoded image bytes each, in order) sampled at ``fps``."""

    frames: tuple[bytes, ...]
    mime_type: str
    fps: float | None = None


ContentPart = TextPart | ImagePart | VideoPart


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
    # None: no log probabilities; k (0-5): each answer token's logprob and its k most likely rivals.
    logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class Thinking:
    """Whether a model with a thinking switch (Qwen3 hybrid, QwQ, QVQ) reasons before answering, and
    at most how many reasoning tokens it may spend (None: up to its context).

    While thinking is on, ``SamplingParams.max_tokens`` caps the answer only (DashScope: it "limits the
    answer, not the reasoning"); the budget is what bounds the reasoning, so the service always sets
    one (the request's ``thinking_budget`` or the model's maximum reasoning length)."""

    enabled: bool
    budget: int | None = None


# Output constraints: what the answer must match. The engine compiles them (a token bitmask over the
# batch for the local engine, a guided-decoding field for an upstream); the service only states them.


@dataclass(frozen=True, slots=True)
class JsonConstraint:
    """A JSON value; ``schema`` None means any JSON object (``response_format: json_object``)."""

    schema: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RegexConstraint:
    pattern: str


@dataclass(frozen=True, slots=True)
class ChoiceConstraint:
    choices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ToolCallConstraint:
    """The answer is a call of the tool ``name`` (a named ``tool_choice``), or of any offered tool
    when ``name`` is None (``tool_choice: "required"``)."""

    name: str | None = None


OutputConstraint = JsonConstraint | RegexConstraint | ChoiceConstraint | ToolCallConstraint
# The names engines use in Capabilities.constraints.
CONSTRAINT_KINDS: Mapping[type[Any], str] = {
    JsonConstraint: "json",
    RegexConstraint: "regex",
    ChoiceConstraint: "choice",
    ToolCallConstraint: "tool_call",
}


@dataclass(frozen=True, slots=True)
class MediaOptions:
    """Request-wide rules for sizing images (the per-image pixel bounds are on :class:`ImagePart`)."""

    # DashScope's vl_high_resolution_images: up to 16384 tokens per image instead of 1280.
    high_resolution: bool = False
    # Qwen-VL-OCR's own default pixel bounds instead of the general ones.
    ocr: bool = False


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams
    tools: tuple[ToolSpec, ...] = ()
    # None: the model has no thinking switch (the engine renders its template's default).
    thinking: Thinking | None = None
    constraint: OutputConstraint | None = None
    media: MediaOptions = MediaOptions()
    # Whether the caller reads the events as they come (a streaming client). False: only the whole
    # answer is used (a non-stream call, a batch line), so an engine may produce it in one piece (the
    # openai engine then asks its upstream for one JSON answer instead of a stream). The events are
    # the same either way.
    stream: bool = True


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
    # Of prompt_tokens: what the request's images and videos took (pads, start/end, timestamps).
    image_tokens: int = 0
    video_tokens: int = 0
    # True when the gateway counted these tokens with the model's tokenizer itself, because the engine
    # behind it did not report them (an upstream that omits usage, or a stream cut short).
    counted_locally: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """A token and its log probability; ``bytes`` are the token's own bytes (a token may hold part
    of a UTF-8 character, which ``token`` then shows as U+FFFD)."""

    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One answer token's log probability under the model's raw distribution (before penalties,
    temperature, top-k/top-p and constraint masks, as vLLM reports by default), and the most likely
    tokens at that position."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New answer text. Never ends inside a UTF-8 character or a possible stop string.

    ``usage`` is the cumulative usage so far when the engine knows it: the native protocol reports it
    on every event, and billing uses the last one seen when a client disconnects mid-stream.
    """

    text: str
    usage: Usage | None = None
    # The tokenizer's special tokens (``<tool_call>``, ``<think>`` ...) the model generated in this
    # delta, as (offset of the token's text in ``text``, token id); None when the engine can't tell
    # (an upstream that only returns text). Parsers use it to tell a real tag from the same characters
    # written as ordinary text.
    specials: tuple[tuple[int, int], ...] | None = None
    # The tokens behind ``text`` when the request asked for logprobs (SamplingParams.logprobs).
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ReasoningTextDelta:
    """New reasoning text, separated by the engine itself (an upstream that returns
    ``reasoning_content``); only engines whose capabilities say ``parses_output`` yield it."""

    text: str
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class ToolCallChunk:
    """A piece of tool call ``call_index``, parsed by the engine itself (``parses_output``): the first
    piece of a call carries ``id`` and ``name``, later ones only more ``arguments`` text."""

    call_index: int
    id: str | None
    name: str | None
    arguments: str
    usage: Usage | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every successful generation."""

    reason: FinishReason
    usage: Usage


GenerationEvent = TextDelta | ReasoningTextDelta | ToolCallChunk | Finished

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
    # Requests waiting inside the engine for one of its slots, for an engine that queues them itself
    # ahead of its work (the openai engine's gate); None: the service's admission count tells it.
    queued: int | None = None


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
    # Whether Thinking.budget is enforced (e.g. by forcing "</think>" when it runs out).
    thinking_budget: bool = False
    # Which OutputConstraint kinds the engine compiles (names from CONSTRAINT_KINDS).
    constraints: frozenset[str] = frozenset()
    # Whether TextDelta.logprobs is filled when SamplingParams.logprobs asks for it.
    logprobs: bool = False
    # Sequences the engine runs at once; admission control queues up to a bound beyond this.
    max_concurrency: int = 1
    # The tokenizer's special tokens by text (e.g. {"<tool_call>": 151657}): a tag listed here is real
    # only where TextDelta.specials marks it; tags not listed are matched as plain text.
    special_tokens: Mapping[str, int] = field(default_factory=dict)
    # Output markup of the checkpoint's chat template (parser names, service/parsers): the tool-call
    # format ("hermes", "qwen3_coder") and whether it marks reasoning ("qwen3"); None: none / unknown.
    tool_format: str | None = None
    reasoning_format: str | None = None
    # The engine separates reasoning and tool calls itself (ReasoningTextDelta, ToolCallChunk; an
    # upstream server that already parses its model's output): the service runs no parser on its text.
    parses_output: bool = False


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

    async def cancelled_usage(self, request_id: str) -> Usage | None:
        """What the generation of ``request_id`` really spent when its caller closed the iterator
        before the :class:`Finished` event: the prompt plus every token generated, delivered or not
        (a token may be generated after the last event the caller read). Waits until the engine has
        stopped that generation, so the count is final. The service settles a cancelled stream with
        it; ``None`` (an engine that can't tell, an id it does not know or was already asked about)
        leaves the service with the last usage it saw. Each id is answered once.
        """

    async def health(self) -> EngineHealth:
        """The engine's state and how many generations it is running now."""

    async def aclose(self) -> None:
        """Stop every generation and free the model."""


@runtime_checkable
class Tokenizes(Protocol):
    """An engine that can show how its model splits text into tokens (``POST /api/v1/tokenizer``).
    Optional: an engine without it answers that endpoint with a 400."""

    def tokenize(self, text: str) -> list[tuple[int, str]]:
        """(token id, token text) for ``text`` as the model reads it, without a chat template."""
