"""Protocol-neutral choice events: what the chat service tells a renderer, and nothing else.

The engine yields token-level :data:`~qwen_gateway.engines.base.GenerationEvent`s; the service turns them
into these per-choice events (parsers split reasoning and tool calls out of the text); one renderer per
wire protocol (``api/render/``) turns them into that protocol's chunks and bodies. Consumers ``match``
on :data:`ChoiceEvent` and end with ``assert_never``, so a new event type is a type error until every
renderer handles it.

A failure is an event too (:class:`StreamFailed`): it is the one way an error reaches a stream, whether
it happens before the first token (the route then answers with the error's HTTP status) or after.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_gateway.engines.base import FinishReason, TokenLogprob, Usage
from qwen_gateway.errors import ApiError


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """New answer text of choice ``index``; ``logprobs``: the tokens behind it, when asked for."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """New reasoning ("thinking") text of choice ``index`` (``reasoning_content`` on the wire)."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of tool call ``call_index`` of choice ``index``: the first piece of a call carries its
    ``id`` and ``name``, later ones only more ``arguments`` text."""

    index: int
    call_index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class ChoiceFinished:
    index: int
    reason: FinishReason


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Usage of the whole request (every choice), after the last :class:`ChoiceFinished`."""

    usage: Usage


@dataclass(frozen=True, slots=True)
class UsageProgress:
    """The request's cumulative usage so far, before the deltas it covers (only when the call asked for
    it: ``ChatCall.usage_progress``; the native protocol reports usage on every event)."""

    usage: Usage


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """The request failed; nothing follows. ``before_output`` is True when no other event preceded
    it, so the answer can still carry the error's own HTTP status. ``usage`` is what the request
    spent before failing (it is charged), once output had started."""

    error: ApiError
    before_output: bool
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One web-search result the model was given, under the number its citation markers use."""

    index: int
    title: str
    url: str
    site_name: str
    icon: str


@dataclass(frozen=True, slots=True)
class SearchInfo:
    """The web search run for a request before generation (``ChatCall.search_info``): what the
    native protocol returns as ``output.search_info`` (with ``enable_source``) and counts in
    ``usage.plugins.search``. Compatible mode returns neither, as DashScope's doesn't."""

    results: tuple[SearchResult, ...]
    # search_options.search_strategy as asked (DashScope echoes it in usage.plugins.search.strategy).
    strategy: str
    # Searches that ran (answered by the provider, with or without hits).
    count: int
    enable_source: bool


ChoiceEvent = (
    ContentDelta
    | ReasoningDelta
    | ToolCallDelta
    | ChoiceFinished
    | UsageReport
    | UsageProgress
    | StreamFailed
)


@dataclass(frozen=True, slots=True)
class ToolCallResult:
    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ChoiceResult:
    """One choice of a finished non-stream answer, accumulated from its events."""

    index: int
    content: list[str]
    reasoning: list[str]
    tool_calls: list[ToolCallResult]
    finish_reason: FinishReason | None = None
    # None: logprobs were not asked for; else every answer token's entry, in order.
    logprobs: list[TokenLogprob] | None = None

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def reasoning_text(self) -> str | None:
        return "".join(self.reasoning) if self.reasoning else None


@dataclass(frozen=True, slots=True)
class ChatResult:
    choices: tuple[ChoiceResult, ...]
    usage: Usage
