"""Chat orchestration: run a validated :class:`ChatCall` on its engine and tell what happened as
protocol-neutral choice events (``service/events.py``), writing one usage-ledger row per request.

Nothing here knows a wire shape: renderers in ``api/render/`` turn the events into compatible-mode (and
later native) chunks and bodies. Every failure, before or after the first token, comes out as one
:class:`StreamFailed` event, so there is exactly one error path for streams.

``n > 1`` is served as ``n`` engine generations run side by side; admission control counts all of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Protocol, assert_never

from qwen_gateway.engines.base import (
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    ReasoningTextDelta,
    TextDelta,
    TokenLogprob,
    ToolCallChunk,
    ToolCallConstraint,
    Usage,
)
from qwen_gateway.errors import ApiError, EngineFailure, ShuttingDown
from qwen_gateway.service.events import (
    ChatResult,
    ChoiceEvent,
    ChoiceFinished,
    ChoiceResult,
    ContentDelta,
    ReasoningDelta,
    StreamFailed,
    ToolCallDelta,
    ToolCallResult,
    UsageProgress,
    UsageReport,
)
from qwen_gateway.service.metrics import Metrics, Timing
from qwen_gateway.service.money.meter import Account
from qwen_gateway.service.parsers import OutputParser, ParserChoice, parser_for
from qwen_gateway.service.validation import ChatCall

log = logging.getLogger(__name__)


class UsageSink(Protocol):
    """Settles a request: writes its ledger row (and, for an admitted account, releases its hold and
    charges it). Provided by the runtime (``Meter.settle``)."""

    async def __call__(
        self,
        call: ChatCall,
        *,
        key_id: str | None,
        status: str,
        usage: Usage,
        account: Account | None,
        latency_ms: int,
    ) -> None: ...


class Admit(Protocol):
    """Checks an account's limits and takes its hold before generating (``Meter.admit``); raises the
    refusal's :class:`ApiError`."""

    async def __call__(self, call: ChatCall, account: Account) -> None: ...


# What runs on an admitted call before the engine sees it (the web search): returns the call to run
# (the same one when there is nothing to do).
Prepare = Callable[[ChatCall], Awaitable[ChatCall]]


class ChatService:
    def __init__(
        self, usage_sink: UsageSink, admit: Admit | None = None, metrics: Metrics | None = None
    ) -> None:
        self._usage_sink = usage_sink
        self._admit = admit
        self._metrics = metrics

    # -- the event stream ------------------------------------------------------------------------------

    async def events(
        self,
        call: ChatCall,
        *,
        key_id: str | None,
        stop: Callable[[], bool] | None = None,
        account: Account | None = None,
        timing: Timing | None = None,
        prepare: Prepare | None = None,
        delivered: bool = True,
    ) -> AsyncGenerator[ChoiceEvent, None]:
        """The request's choice events, ending with :class:`UsageReport` or :class:`StreamFailed`.

        The caller must close the generator (``aclose()``) when it stops early: that is how the engine
        learns its consumer is gone and how the admission slots are given back. ``stop`` is asked
        between tokens (the server's shutdown): once it says so, the request ends there with a
        :class:`StreamFailed` (:class:`ShuttingDown`) that carries the tokens really used.

        ``account`` (a metered or limited key) is admitted first (limits, balance hold: a refusal is a
        :class:`StreamFailed` before output, nothing charged, no ledger row) and settled at the end with
        what the request spent: prompt + generated tokens, nothing for a failure before output.

        ``prepare`` (the web search) runs once the request is admitted and its hold taken, before the
        engine sees it, and gives the call that runs: work that costs something (a provider call) is
        never done for a request that is refused.

        ``delivered``: whether each event reaches the client as it is yielded (a stream). A consumer
        that collects the whole answer first (:meth:`complete`) passes False: a failure then leaves
        the client with an error and nothing else, so it is charged nothing, as before any output.
        """
        started = time.monotonic()
        timing = timing or Timing()
        try:
            ticket = call.model.admission.acquire(call.n, background=call.background)
        except ApiError as exc:  # refused before any generation: no charge, no ledger row
            yield StreamFailed(exc, before_output=True)
            return
        usage: list[Usage | None] = [None] * call.n
        closed_early = set(range(call.n))  # choices whose engine stream ended without Finished/error
        parsers = _parsers(call)
        status = "cancelled"
        emitted = False  # an event was yielded (and, if ``delivered``, so reached the client)
        finished = 0
        ended: set[int] = set()  # choices whose parser wanted no more output
        # What an engine stream closed before its Finished says it spent (see _spent_report).
        late: dict[int, Usage] = {}
        engine_events = self._engine_events(call, late, timing)
        settle = True
        try:
            if account is not None and self._admit is not None:
                try:
                    await self._admit(call, account)
                except ApiError as exc:
                    yield StreamFailed(exc, before_output=True)
                    return
                finally:
                    # Refused, or cancelled while admitting: settled below only if the hold was taken.
                    settle = account.admitted
            if prepare is not None:
                prepared = await prepare(call)
                if prepared is not call:
                    await engine_events.aclose()  # not started: it was made for the call before
                    call = prepared
                    engine_events = self._engine_events(call, late, timing)
            try:
                async for index, event in engine_events:
                    if index in ended:
                        continue
                    match event:
                        case TextDelta():
                            if event.usage is not None:
                                usage[index] = event.usage
                            out = parsers[index].feed(event.text, event.specials)
                            if event.logprobs:
                                out = _with_logprobs(out, index, event.logprobs)
                            if call.usage_progress and event.usage is not None:
                                out.insert(0, UsageProgress(_total(usage)))
                            if parsers[index].done:
                                # A single tool call is complete (parallel_tool_calls false): the
                                # choice ends here, and so does its generation once all have.
                                ended.add(index)
                                finished += 1
                                out += [*parsers[index].finish(), ChoiceFinished(index, "tool_calls")]
                        case ReasoningTextDelta():  # an engine that parses its own output
                            if event.usage is not None:
                                usage[index] = event.usage
                            out = [ReasoningDelta(index, event.text)] if event.text else []
                        case ToolCallChunk():
                            if event.usage is not None:
                                usage[index] = event.usage
                            out = [
                                ToolCallDelta(index, event.call_index, event.id, event.name, event.arguments)
                            ]
                        case Finished():
                            usage[index] = event.usage
                            closed_early.discard(index)
                            finished += 1
                            parser = parsers[index]
                            out = [*parser.finish(), ChoiceFinished(index, _reason(event.reason, parser))]
                        case _:
                            assert_never(event)
                    if out and not emitted and self._metrics is not None:
                        self._metrics.first_output(call.model.id, timing)
                    for item in out:
                        emitted = True
                        yield item
                    if len(ended) == call.n:
                        break
                    if stop is not None and finished < call.n and stop():
                        raise ShuttingDown()
            except ApiError as exc:
                status = "error"
                _apply(usage, late)
                closed_early.clear()
                yield StreamFailed(exc, before_output=not emitted, usage=_spent(usage, emitted and delivered))
                return
            except Exception:
                status = "error"
                closed_early.clear()
                log.exception("generation of request %s failed", call.request_id)
                _apply(usage, late)
                yield StreamFailed(
                    EngineFailure(), before_output=not emitted, usage=_spent(usage, emitted and delivered)
                )
                return
            status = "ok"
            yield UsageReport(_total(usage))
        finally:
            await engine_events.aclose()
            ticket.release()
            if status == "cancelled" and not delivered and stop is not None and stop():
                # Interrupted by the server's shutdown before reaching a token boundary (queued, in a
                # long prefill): the client of a whole answer gets a 503 and nothing else, a failure.
                status = "error"
            if status != "ok":
                _apply(usage, late)
            if settle and status == "cancelled":
                # The client went away: the engine may have generated past the last event read (a
                # token still in its outbox); it tells the final count once it has stopped.
                await self._engine_counts(call, usage, closed_early)
            if settle:
                # A failure is charged what it reported spending (nothing before output reached the
                # client); a client that went away, everything generated until then.
                spent = (
                    _total(usage)
                    if status != "error"
                    else (_spent(usage, emitted and delivered) or Usage(0, 0))
                )
                latency_ms = int((time.monotonic() - started) * 1000)
                await self._settle(call, key_id, status, spent, account, latency_ms)
                if self._metrics is not None:
                    self._metrics.finished(call.model.id, status, spent, timing)

    async def complete(
        self,
        call: ChatCall,
        *,
        key_id: str | None,
        stop: Callable[[], bool] | None = None,
        account: Account | None = None,
        timing: Timing | None = None,
        prepare: Prepare | None = None,
    ) -> ChatResult:
        """The whole answer at once (non-stream); a failure raises its :class:`ApiError`. ``prepare``:
        as for :meth:`events`."""
        wants_logprobs = call.generation.sampling.logprobs is not None
        choices = [
            ChoiceResult(i, [], [], [], logprobs=[] if wants_logprobs else None) for i in range(call.n)
        ]
        calls: dict[tuple[int, int], list[str]] = {}
        heads: dict[tuple[int, int], tuple[str, str]] = {}
        total = Usage(0, 0)
        # Nothing reaches the client before the whole answer: a failure half-way is charged nothing.
        events = self.events(
            call, key_id=key_id, stop=stop, account=account, timing=timing, prepare=prepare, delivered=False
        )
        try:
            async for event in events:
                match event:
                    case ContentDelta():
                        choices[event.index].content.append(event.text)
                        if event.logprobs:
                            choices[event.index].logprobs.extend(event.logprobs)  # type: ignore[union-attr]
                    case ReasoningDelta():
                        choices[event.index].reasoning.append(event.text)
                    case ToolCallDelta():
                        key = (event.index, event.call_index)
                        if key not in heads:
                            heads[key] = (event.id or "", event.name or "")
                        calls.setdefault(key, []).append(event.arguments)
                    case ChoiceFinished():
                        choices[event.index].finish_reason = event.reason
                    case UsageReport():
                        total = event.usage
                    case UsageProgress():
                        pass
                    case StreamFailed():
                        raise event.error
                    case _:
                        assert_never(event)
        finally:
            await events.aclose()
        for (index, _), parts in sorted(calls.items()):
            call_id, name = heads[(index, _)]
            choices[index].tool_calls.append(ToolCallResult(call_id, name, "".join(parts)))
        return ChatResult(tuple(choices), total)

    # -- internals -------------------------------------------------------------------------------------

    def _requests(self, call: ChatCall) -> list[GenerationRequest]:
        """One engine request per choice; seeded choices get seed+i so they differ but repeat."""
        if call.n == 1:
            return [call.generation]
        out = []
        for i in range(call.n):
            sampling = call.generation.sampling
            if sampling.seed is not None:
                sampling = dataclasses.replace(sampling, seed=(sampling.seed + i) % (2**63))
            out.append(
                dataclasses.replace(call.generation, request_id=f"{call.request_id}-{i}", sampling=sampling)
            )
        return out

    async def _engine_events(
        self, call: ChatCall, late: dict[int, Usage], timing: Timing
    ) -> AsyncGenerator[tuple[int, GenerationEvent], None]:
        """(choice index, event) from every choice's engine stream, as they come; a stream closed
        before its end reports what it spent into ``late``."""
        engine = call.model.engine
        requests = self._requests(call)
        if len(requests) == 1:
            stream = engine.generate(requests[0])
            try:
                iterator = aiter(stream)
                while True:
                    # Time awaiting the engine is not the gateway's overhead (the X-Gateway-Overhead-Ms
                    # header and metric): two clock reads per event.
                    timing.waiting_since = since = time.perf_counter()
                    try:
                        event = await anext(iterator)
                    except StopAsyncIteration:
                        break
                    finally:
                        timing.engine += time.perf_counter() - since
                        timing.waiting_since = None
                    yield 0, event
            finally:
                await _aclose(stream)
                _spent_report(stream, 0, late)
            return
        queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, request: GenerationRequest) -> None:
            stream = engine.generate(request)
            try:
                async for event in stream:
                    queue.put_nowait((index, event))
                queue.put_nowait((index, None))
            except Exception as exc:
                queue.put_nowait((index, exc))
            finally:
                await _aclose(stream)
                _spent_report(stream, index, late)

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            remaining = len(tasks)
            while remaining:
                timing.waiting_since = since = time.perf_counter()
                try:
                    index, item = await queue.get()
                finally:
                    timing.engine += time.perf_counter() - since
                    timing.waiting_since = None
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _engine_counts(self, call: ChatCall, usage: list[Usage | None], choices: set[int]) -> None:
        """Replace the usage seen of each choice closed early by the engine's own final count."""
        engine = call.model.engine
        requests = self._requests(call)
        for index in sorted(choices):
            try:
                final = await engine.cancelled_usage(requests[index].request_id)
            except Exception:  # settling must go on: the last usage seen is then charged
                log.exception("request %s: the engine's final count failed", call.request_id)
                continue
            if final is not None:
                usage[index] = final

    async def _settle(
        self,
        call: ChatCall,
        key_id: str | None,
        status: str,
        usage: Usage,
        account: Account | None,
        latency_ms: int,
    ) -> None:
        try:
            await self._usage_sink(
                call, key_id=key_id, status=status, usage=usage, account=account, latency_ms=latency_ms
            )
        except Exception:  # the answer is already out; losing the row is logged, never raised
            log.exception("recording usage of request %s failed", call.request_id)


def _with_logprobs(
    out: list[ChoiceEvent], index: int, logprobs: tuple[TokenLogprob, ...]
) -> list[ChoiceEvent]:
    """Logprobs ride on the first content delta the engine delta produced; when the parser produced
    none (text held back, or reasoning / tool-call text), on an empty content delta of their own, so
    every answer token's entry is reported exactly once."""
    for i, item in enumerate(out):
        if isinstance(item, ContentDelta):
            return [*out[:i], dataclasses.replace(item, logprobs=logprobs), *out[i + 1 :]]
    return [*out, ContentDelta(index, "", logprobs)]


def _parsers(call: ChatCall) -> list[OutputParser]:
    choice = ParserChoice(
        thinking=call.thinking,
        tools=bool(call.generation.tools),
        parallel_tool_calls=call.parallel_tool_calls,
        forced_call=isinstance(call.generation.constraint, ToolCallConstraint),
        tool_parameters={t.name: t.parameters for t in call.generation.tools},
    )
    capabilities = call.model.engine.capabilities
    return [parser_for(i, capabilities, choice) for i in range(call.n)]


def _reason(reason: FinishReason, parser: OutputParser) -> FinishReason:
    """An answer that ended on its own after calling tools finished to have them called."""
    return "tool_calls" if reason == "stop" and parser.tool_calls else reason


def _spent(usage: list[Usage | None], emitted: bool) -> Usage | None:
    """What a request that failed after its first event is charged (reported with the failure)."""
    return _total(usage) if emitted else None


def _total(usage: list[Usage | None]) -> Usage:
    prompt = completion = reasoning = image = video = 0
    local = False
    for u in usage:
        if u is None:
            continue
        local = local or u.counted_locally
        # Every choice shares one prompt: count it once, as OpenAI and DashScope do.
        prompt = max(prompt, u.prompt_tokens)
        image, video = max(image, u.image_tokens), max(video, u.video_tokens)
        completion += u.completion_tokens
        reasoning += u.reasoning_tokens
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        reasoning_tokens=reasoning,
        image_tokens=image,
        video_tokens=video,
        counted_locally=local,
    )


async def _aclose(stream: AsyncIterator[GenerationEvent]) -> None:
    """Close an engine stream: that is how an engine learns its consumer is gone."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _spent_report(stream: AsyncIterator[GenerationEvent], index: int, late: dict[int, Usage]) -> None:
    """An engine stream may offer ``spent() -> Usage | None``: what it used when it ended without a
    Finished (cancelled, or failed mid-stream), counted by the engine itself after the fact, so that
    counting costs nothing on requests that finish normally."""
    spent = getattr(stream, "spent", None)
    if spent is not None and (reported := spent()) is not None:
        late[index] = reported


def _apply(usage: list[Usage | None], late: dict[int, Usage]) -> None:
    for index, reported in late.items():
        usage[index] = reported
