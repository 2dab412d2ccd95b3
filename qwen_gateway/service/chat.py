"""Chat orchestration: run a validated :class:`ChatCall` on its engine, answer in compatible-mode shape,
and write one usage-ledger row per request (after the answer, in one transaction).

The engine yields typed events; this module turns them into wire dicts. SSE framing is the API
layer's job (``api/sse.py``). ``n > 1`` is served as ``n`` engine generations run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from qwen_gateway.engines.base import Finished, GenerationEvent, GenerationRequest, TextDelta, Usage
from qwen_gateway.errors import ApiError, EngineFailure
from qwen_gateway.protocol import compat
from qwen_gateway.service.validation import ChatCall

log = logging.getLogger(__name__)

# (request_id, key_id, model, status, usage) -> None; provided by the runtime (writes the ledger).
UsageSink = Callable[[str, str | None, str, str, Usage], Awaitable[None]]


@dataclass(slots=True)
class _Choice:
    index: int
    text: list[str] = dataclasses.field(default_factory=list)
    usage: Usage | None = None
    finish: Finished | None = None


class ChatService:
    def __init__(self, usage_sink: UsageSink) -> None:
        self._usage_sink = usage_sink

    # -- running -----------------------------------------------------------------------------------

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

    async def _events(self, call: ChatCall) -> AsyncGenerator[tuple[int, GenerationEvent], None]:
        """(choice index, event) from every choice's engine stream, as they come."""
        engine = call.model.engine
        requests = self._requests(call)
        if len(requests) == 1:
            stream = engine.generate(requests[0])
            try:
                async for event in stream:
                    yield 0, event
            finally:
                await _aclose(stream)
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

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
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

    @staticmethod
    def _total(choices: list[_Choice]) -> Usage:
        prompt = 0
        completion = 0
        for choice in choices:
            usage = choice.finish.usage if choice.finish else choice.usage
            if usage is None:
                continue
            # Every choice shares one prompt: count it once, as OpenAI and DashScope do.
            prompt = max(prompt, usage.prompt_tokens)
            completion += usage.completion_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion)

    async def _settle(self, call: ChatCall, key_id: str | None, status: str, usage: Usage) -> None:
        try:
            await self._usage_sink(call.request_id, key_id, call.model.id, status, usage)
        except Exception:  # the answer is already out; losing the row is logged, never raised
            log.exception("recording usage of request %s failed", call.request_id)

    # -- non-stream ------------------------------------------------------------------------------------

    async def complete(self, call: ChatCall, *, key_id: str | None) -> dict[str, Any]:
        choices = [_Choice(i) for i in range(call.n)]
        status = "error"
        try:
            async for index, event in self._events(call):
                choice = choices[index]
                if isinstance(event, TextDelta):
                    choice.text.append(event.text)
                    choice.usage = event.usage or choice.usage
                else:
                    choice.finish = event
            status = "ok"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            await self._settle(call, key_id, status, self._total(choices))
        total = self._total(choices)
        return compat.completion_dict(
            completion_id=call.completion_id,
            created=call.created,
            model=call.model.id,
            choices=[
                compat.choice_dict(
                    index=c.index,
                    content="".join(c.text),
                    finish_reason=c.finish.reason if c.finish else "stop",
                )
                for c in choices
            ],
            usage=compat.usage_dict(total.prompt_tokens, total.completion_tokens),
        )

    # -- stream ----------------------------------------------------------------------------------------

    async def stream(self, call: ChatCall, *, key_id: str | None) -> AsyncGenerator[dict[str, Any], None]:
        """Chunks in DashScope's order: role chunk, content deltas, finish chunk per choice, then the
        usage chunk when asked for. An error after the first chunk is yielded as an error object (the
        API layer then ends the stream); the ledger records the tokens spent up to that point."""
        choices = [_Choice(i) for i in range(call.n)]

        def chunk(choice_list: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
            return compat.chunk_dict(
                completion_id=call.completion_id,
                created=call.created,
                model=call.model.id,
                choices=choice_list,
                usage=usage,
            )

        status = "cancelled"
        events = self._events(call)
        try:
            # The engine raises request errors (e.g. context too long) before its first event: pull
            # it before sending anything so such errors still get a proper HTTP status.
            first = await anext(events, None)
            for c in choices:
                yield chunk([compat.chunk_choice(index=c.index, delta={"content": "", "role": "assistant"})])
            pending = [first] if first is not None else []
            try:
                while True:
                    if pending:
                        index, event = pending.pop()
                    else:
                        nxt = await anext(events, None)
                        if nxt is None:
                            break
                        index, event = nxt
                    choice = choices[index]
                    if isinstance(event, TextDelta):
                        choice.usage = event.usage or choice.usage
                        if event.text:
                            yield chunk([compat.chunk_choice(index=index, delta={"content": event.text})])
                    else:
                        choice.finish = event
                        yield chunk(
                            [
                                compat.chunk_choice(
                                    index=index, delta={"content": ""}, finish_reason=event.reason
                                )
                            ]
                        )
                status = "ok"
            except ApiError as exc:
                status = "error"
                yield _error_payload(exc, call.request_id)
                return
            except Exception:
                status = "error"
                log.exception("stream of request %s failed", call.request_id)
                yield _error_payload(EngineFailure(), call.request_id)
                return
            if call.include_usage:
                total = self._total(choices)
                yield chunk([], compat.usage_dict(total.prompt_tokens, total.completion_tokens))
        except Exception:
            status = "error"
            raise
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()
            await self._settle(call, key_id, status, self._total(choices))


async def _aclose(stream: AsyncIterator[GenerationEvent]) -> None:
    """Close an engine stream: that is how an engine learns its consumer is gone."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _error_payload(exc: ApiError, request_id: str) -> dict[str, Any]:
    return compat.error_dict(
        message=exc.message, type_=exc.type, code=exc.code, param=exc.param, request_id=request_id
    )
