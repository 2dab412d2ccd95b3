"""``POST /chat/completions`` (compatible mode)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from qwen_gateway.api.deps import KeyedRoute, account_of, get_gateway, key_id_of
from qwen_gateway.api.errors import request_id_of
from qwen_gateway.api.lifecycle import resume_until_shutdown
from qwen_gateway.api.render import compat
from qwen_gateway.api.responses import JSONBytesResponse
from qwen_gateway.api.sse import SSEResponse
from qwen_gateway.errors import ApiError, PayloadTooLarge, ShuttingDown
from qwen_gateway.service import fileids
from qwen_gateway.service.events import ChatResult, ChoiceEvent, StreamFailed
from qwen_gateway.service.media import resolve as resolve_media
from qwen_gateway.service.metrics import Timing
from qwen_gateway.service.validation import ChatCall, build_call, parse_body

log = logging.getLogger(__name__)

router = APIRouter(route_class=KeyedRoute)

# Seconds a stream may wait for its first event before the headers go out anyway.
FIRST_CHUNK_WAIT = 1.0
# The gateway's own time on the request so far (everything but awaiting the engine), in ms: for a
# stream, until its headers; for a whole answer, until the body.
OVERHEAD_HEADER = "X-Gateway-Overhead-Ms"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes ``limit`` (before it is all in memory)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


# The cancel message that marks a request task cancelled because its client went away.
_CLIENT_GONE = "qwen-gateway: client disconnected"


async def _cancel_on_disconnect(request: Request, task: asyncio.Task[Any] | None) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    if task is not None:
        task.cancel(_CLIENT_GONE)


def _client_gone(exc: asyncio.CancelledError, task: asyncio.Task[Any] | None) -> bool:
    """Whether ``exc`` is :func:`_cancel_on_disconnect`'s cancel of ``task`` and nothing else (the
    server's last-resort cancel); if so the task carries on, to answer 499."""
    if exc.args != (_CLIENT_GONE,) or task is None or task.cancelling() != 1:
        return False
    task.uncancel()
    return True


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    timing = Timing()
    gateway = get_gateway(request)
    body = parse_body(await read_body(request, gateway.settings.max_request_bytes))
    # A full engine refuses now, before the rest of the validation, media and search (the answer can
    # only be this 503: see Admission.refuse_if_full); the real admission still follows.
    admission = gateway.models.admission_of(body.get("model"))
    if admission is not None:
        admission.refuse_if_full(body.get("n"))
    call = build_call(body, gateway.models, request_id=request_id_of(request))
    # Every image and video of the request, fetched concurrently before anything runs: a refusal is a
    # plain 400 (never charged), before any header of a stream goes out.
    call = await resolve_media(call, gateway.media)
    # The web search (enable_search) runs once the request is admitted and held for (an over-limit key
    # or a full engine costs no provider call); the hold covers the most its results can add to the
    # prompt, and the exact prompt, results included, is what is counted and charged.
    call = gateway.search.plan(call)
    return await answer(
        request, call, compat.sse_frames, compat.completion_body, timing, prepare=gateway.search.apply
    )


Frames = Callable[[ChatCall, AsyncGenerator[ChoiceEvent, None]], AsyncGenerator[bytes, None]]


async def answer(
    request: Request,
    call: ChatCall,
    frames: Frames,
    body: Callable[[ChatCall, ChatResult], dict[str, Any]],
    timing: Timing,
    *,
    prepare: Callable[[ChatCall], Awaitable[ChatCall]] | None = None,
) -> Response:
    """Run a validated call and answer it, streamed (``frames``) or whole (``body``): the part of a
    chat route both protocols share (admission, money, shutdown, disconnects). ``timing`` started
    when the request arrived (the gateway's own overhead, reported in a header and /metrics).
    ``prepare`` runs on the admitted call (the web search, ChatService.events); the renderers are
    given the call it made."""
    ran = [call]
    if prepare is not None:
        before = prepare

        async def prepared(admitted: ChatCall) -> ChatCall:
            ran[0] = await before(admitted)
            return ran[0]

        prepare = prepared
    gateway = get_gateway(request)
    key_id = key_id_of(request)
    # Qwen-Long: fileid:// system messages get their documents' text (a bad reference is a 400 here).
    call = await fileids.inject(
        call, gateway.files, key_id=key_id, max_files=gateway.settings.files.max_files_per_request
    )
    account = account_of(request)
    if call.stream:
        shutdown = request.app.state.shutdown
        events = gateway.chat.events(
            call,
            key_id=key_id,
            stop=lambda: shutdown.expired,
            account=account,
            timing=timing,
            prepare=prepare,
        )
        # Wait a little for the first event before any header goes out: errors found before generating
        # (a prompt longer than the context, a full queue) then get their own HTTP status. A long
        # prefill doesn't hold the headers back longer than that: the stream starts, keep-alives flow,
        # a disconnect is noticed, and a late error goes in-band.
        first = asyncio.ensure_future(anext(events, None))
        await asyncio.wait({first}, timeout=FIRST_CHUNK_WAIT)
        if first.done():
            event = first.result()
            if isinstance(event, StreamFailed) and event.before_output:
                await events.aclose()
                raise fileids.map_error(call, event.error)
        source = resume_until_shutdown(first, events, shutdown, call.request_id)
        # The call that runs (ran[0]) is known once the first event is out: usually by now, and the
        # frames are rendered straight from the source; after a slow start they wait for it.
        return SSEResponse(
            frames(ran[0], source) if first.done() else _frames_of_the_call_run(ran, frames, source),
            keepalive=gateway.settings.keepalive_seconds,
            headers={OVERHEAD_HEADER: f"{timing.overhead_ms():.2f}"},
        )

    # A client that hangs up on a non-stream call frees the engine too; so does the end of the
    # shutdown grace period (the client gets a 503 and nothing else, so the row is a failure charged
    # nothing): the service stops at a token boundary, or the shutdown interrupts a request that
    # reaches none in time.
    # The call runs in this task; one watcher task cancels it if the client goes away.
    shutdown = request.app.state.shutdown
    me = shutdown.register()
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, me))
    try:
        result = await gateway.chat.complete(
            call,
            key_id=key_id,
            stop=lambda: shutdown.expired,
            account=account,
            timing=timing,
            prepare=prepare,
        )
    except asyncio.CancelledError as exc:
        if shutdown.interrupted(exc):
            log.info("request %s: stopped by the server's shutdown (grace period over)", call.request_id)
            raise ShuttingDown() from None
        if not _client_gone(exc, me):
            raise
        # Nobody is listening any more; 499 is what proxies log for "client closed request".
        return Response(status_code=499)
    except ShuttingDown:
        log.info("request %s: stopped by the server's shutdown (grace period over)", call.request_id)
        raise
    except ApiError as exc:
        raise fileids.map_error(call, exc) from None
    finally:
        shutdown.unregister(me)
        # Not awaited: it only waits in receive(), and cancelling it ends it at its next step.
        watcher.cancel()
    return JSONBytesResponse(body(ran[0], result), headers={OVERHEAD_HEADER: f"{timing.overhead_ms():.2f}"})


async def _frames_of_the_call_run(
    ran: list[ChatCall], frames: Frames, source: AsyncGenerator[ChoiceEvent, None]
) -> AsyncGenerator[bytes, None]:
    """``frames`` of the call the service ran (``ran[0]``, searched after admission), which is known
    once the first event is out (the search runs before the engine's first token)."""
    head = await anext(source, None)

    async def again() -> AsyncGenerator[ChoiceEvent, None]:
        if head is None:
            return
        yield head
        async for event in source:
            yield event

    events = again()
    try:
        async for frame in frames(ran[0], events):
            yield frame
    finally:
        await events.aclose()
        await source.aclose()
