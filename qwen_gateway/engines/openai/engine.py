"""The ``openai`` engine: a model served by OpenAI-compatible upstream servers (vLLM, SGLang, Ollama,
llama.cpp's server, DashScope's compatible mode), one or several replicas, on one pooled HTTP/1.1
keep-alive client owned by the engine.

A streaming client's request is streamed upstream; a client's non-stream call (and a batch line) is a
non-streamed upstream call, one JSON answer turned into the same events (one read and one parse
instead of an event per token through the whole stack). Nothing above ``engines/``
sees an aiohttp or socket exception: :meth:`OpenAIEngine._open` and :meth:`OpenAIEngine.run` map
each to our error tree here, and the upstream's own message goes to the server log only (it may name
internals of the upstream). The HTTP side (one pooled session, server-sent events) is http.py.

Faults: a replica that fails before its first streamed event (a non-streamed call: before its whole
answer is read, ``answer_timeout``) is retried on another one (the client never sees it and is charged
once: nothing was delivered); each failure feeds that replica's circuit
breaker; an upstream that dies after the first event ends the request with ``EngineFailure`` (the
service sends it in-band with the end marker) and the request is charged what was delivered, counted
here (:meth:`_Stream.spent`). Closing the stream (client gone) closes the upstream connection at once,
which is how vLLM and friends learn to abort; a stream read to its end returns its connection to the
pool (keep-alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import aiohttp
import orjson
from pydantic import SecretStr

from qwen_gateway.engines.base import (
    Capabilities,
    EngineHealth,
    EngineState,
    Finished,
    GenerationEvent,
    GenerationRequest,
    Usage,
)
from qwen_gateway.engines.openai.counting import OFF_LOOP_BYTES, TokenCounter, prompt_bound
from qwen_gateway.engines.openai.gate import Gate
from qwen_gateway.engines.openai.http import EventStream, dumps, loads, session, sse_payloads
from qwen_gateway.engines.openai.options import DashScopeModelConfig, OpenAIModelConfig
from qwen_gateway.engines.openai.replicas import Replica, ReplicaSet
from qwen_gateway.engines.openai.wire import (
    ChunkReader,
    Dialect,
    UnsupportedField,
    UpstreamProtocolError,
    max_tokens_asked,
    request_body,
)
from qwen_gateway.errors import (
    ApiError,
    EngineFailure,
    EngineOverloaded,
    EngineUnavailable,
    InvalidParameter,
    StartupError,
)
from qwen_gateway.settings import Settings

if TYPE_CHECKING:
    from qwen_gateway.engines.registry import SharedLoads

log = logging.getLogger(__name__)

# Context assumed when neither the upstream (/models) nor the config says (the catalog's fallback).
DEFAULT_CONTEXT = 32_768


class _Retry(Exception):
    """A failure before the first byte that another replica may not have (connection, 5xx, 429...)."""

    def __init__(self, error: ApiError, detail: str, *, retry: bool = True) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail
        # False: the request itself was refused (4xx); another replica would refuse it too.
        self.retry = retry


class OpenAIEngine:
    config_model: ClassVar[type[OpenAIModelConfig]] = OpenAIModelConfig
    name = "openai"
    dialect = Dialect()

    # Takes the registry's SharedLoads: entries counting with one tokenizer directory share its
    # TokenCounter (read-only once built; parsing a 151k-entry tokenizer.json is ~0.5 s each).
    shares_loads = True

    def __init__(
        self,
        config: OpenAIModelConfig,
        *,
        settings: Settings | None = None,
        shared: SharedLoads | None = None,
    ) -> None:
        self._config = config
        self._model = config.upstream_model or config.id
        self._replicas = ReplicaSet(
            config.urls, failures_to_open=config.breaker_failures, cooldown=config.breaker_cooldown
        )
        self._counter = self._token_counter(config, shared)
        # At most max_concurrency requests in flight upstream, across the replicas (gate.py).
        self._gate = Gate(config.max_concurrency)
        self._client: aiohttp.ClientSession | None = None
        self._key: SecretStr | None = None
        self._context: int = config.context_length or DEFAULT_CONTEXT
        # Whether the context is the upstream's own (configured, or learned from its /models), not the
        # default stand-in: only a known one is checked against (DashScope's /models tells none, and
        # its models' contexts are far above the default).
        self._context_known = config.context_length is not None
        self._health_task: asyncio.Task[None] | None = None
        self._state = EngineState.LOADING
        self._errors: Counter[tuple[int, str]] = Counter()  # (replica index, kind) -> count
        self._dialect = Dialect(
            dashscope=isinstance(config, DashScopeModelConfig), thinking_budget=config.thinking_budget
        )
        self._capabilities = self._make_capabilities()

    # -- Engine protocol -------------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def start(self) -> None:
        env = self._config.api_key_env
        if env is not None:
            value = os.environ.get(env)
            if not value:
                # Named only when it reads as a variable name by convention (upper case): a key in
                # the form of a valid name (sk_abc123) is not echoed into the printed, logged error.
                shown = env if _CONVENTIONAL_ENV_NAME.fullmatch(env) else "named by api_key_env (not shown)"
                raise StartupError(f"model {self._config.id!r}: environment variable {shown} is not set")
            self._key = SecretStr(value)
        cfg = self._config
        self._client = session(
            max_connections=cfg.max_connections, connect_timeout=cfg.connect_timeout, headers=self._headers()
        )
        if not self._config.tokenizer:
            log.warning(
                "model %r: no tokenizer configured; tokens the upstream does not report are estimated",
                self._config.id,
            )
        learned = await self._probe_all()
        if learned is not None and self._config.context_length is None:
            self._context, self._context_known = learned, True
            self._capabilities = self._make_capabilities()
        self._state = EngineState.READY
        self._health_task = asyncio.create_task(self._health_loop())

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        return _Stream(self, request)

    async def cancelled_usage(self, request_id: str) -> Usage | None:
        # An upstream stream closed early tells what it spent through its own ``spent()`` (the tokens
        # delivered, counted with the model's tokenizer when the upstream sent no usage), which the
        # service reads as the stream ends; the upstream's own count past that is not knowable here.
        return None

    async def health(self) -> EngineHealth:
        gate = self._gate
        # Unreachable: every replica's breaker is open (breaker_failures request failures in a row, or
        # a failed active check: the start's probe, a health check); a readiness probe then keeps this
        # process out of rotation. One failed request does not: it is what the breaker counts, and
        # taking a working gateway out of its load balancer for it would be worse than the failure.
        if self._state is EngineState.READY and not self._replicas.reachable:
            return EngineHealth(
                EngineState.FAILED, gate.in_use, "no upstream replica is reachable", queued=gate.waiting
            )
        return EngineHealth(self._state, gate.in_use, queued=gate.waiting)

    def upstream_errors(self) -> Mapping[tuple[int, str], int]:
        """Failures so far by (replica index, kind): "before_first_byte" (retried on another replica
        when there is one), "refused" (the upstream answered 4xx), "mid_stream"."""
        return self._errors

    async def aclose(self) -> None:
        self._state = EngineState.CLOSED
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._client is not None:
            await self._client.close()

    # -- internals -------------------------------------------------------------------------------------

    @staticmethod
    def _token_counter(config: OpenAIModelConfig, shared: SharedLoads | None) -> TokenCounter:
        if config.tokenizer is None or shared is None:
            return TokenCounter(config.tokenizer)
        directory = config.tokenizer
        # The same files give the same counter: keyed by where they are, however the path was spelt.
        key = ("token-counter", str(Path(directory).expanduser().resolve()))
        counter, _owner = shared.get_or_load(key, config.id, lambda: TokenCounter(directory))
        return counter

    def _make_capabilities(self) -> Capabilities:
        cfg = self._config
        return Capabilities(
            max_context=self._context,
            vision="image" in cfg.modalities,
            video="video" in cfg.modalities,
            tools=True,
            reasoning=cfg.reasoning,
            stop_token_ids=False,  # OpenAI's API takes stop strings only
            thinking_budget=cfg.thinking_budget,
            constraints=frozenset({"json", "tool_call"}),  # response_format and tool_choice
            max_concurrency=cfg.max_concurrency,
            parses_output=True,
        )

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key.get_secret_value()}"
        return headers

    async def _probe(self, replica: Replica) -> int | None:
        """GET <replica>/models: the replica answers, and its context length if it reports one."""
        assert self._client is not None
        timeout = aiohttp.ClientTimeout(total=self._config.connect_timeout * 2)
        async with self._client.get(replica.models_url, timeout=timeout) as response:
            if response.status != 200:
                raise UpstreamProtocolError(f"GET /models answered {response.status}")
            listing = orjson.loads(await response.read())
        if not isinstance(listing, dict):
            raise UpstreamProtocolError("GET /models did not answer an object")
        for entry in listing.get("data") or ():
            if isinstance(entry, dict) and entry.get("id") == self._model:
                value = entry.get("max_model_len") or entry.get("context_length")
                return value if isinstance(value, int) and value > 0 else None
        return None

    async def _probe_all(self) -> int | None:
        learned: int | None = None
        for replica in self._replicas.replicas:
            try:
                found = await self._probe(replica)
            except (aiohttp.ClientError, OSError, UpstreamProtocolError, ValueError) as exc:
                # As a failed health check: skipped until the first one finds it answering.
                self._replicas.check_failed(replica, self._config.health_interval)
                log.warning(
                    "model %r: upstream %s did not answer: %s",
                    self._config.id,
                    replica.shown,
                    replica.reason(exc),
                )
                continue
            self._replicas.succeeded(replica)
            if found is not None:
                learned = found if learned is None else min(learned, found)
        if learned is not None:
            log.info("model %r: upstream reports a context of %d tokens", self._config.id, learned)
        return learned

    async def _health_loop(self) -> None:
        """Active checks: a replica that stops answering is skipped before a request finds out; one
        that answers again gets a trial request (half-open) rather than the full load at once."""
        while True:
            await asyncio.sleep(self._config.health_interval)
            for replica in self._replicas.replicas:
                try:
                    await self._probe(replica)
                except (aiohttp.ClientError, OSError, UpstreamProtocolError, ValueError) as exc:
                    if replica.healthy:
                        log.warning(
                            "upstream %s failed its health check: %s",
                            replica.shown,
                            replica.reason(exc),
                        )
                    self._replicas.check_failed(replica, self._config.health_interval)
                    continue
                self._replicas.check_passed(replica)

    async def _room(self, request: GenerationRequest, stream: _Stream) -> int | None:
        """The tokens the context leaves after the prompt, when the upstream's ``max_tokens`` may not
        fit beside it (None: it fits, or the count is an estimate that says the prompt does not).
        Only with an exact count (a tokenizer with its chat template) and a known context: an
        estimate may be off either way (it over-counted a 20k-token prompt by half, which cut its
        answer to a third), and the default context is no upstream's.

        Counted only then: a bound from the prompt's bytes settles most requests without tokenizing.
        A prompt of the context's length or more is refused (counted exactly, with the tokenizer) as
        the local engines refuse it; a long one is counted off the event loop, in pieces that stop
        once past the context."""
        if not (self._context_known and self._counter.exact_prompts):
            return None
        context = self._context
        bound = prompt_bound(request.messages, request.tools)
        if bound + max_tokens_asked(request, self._dialect) <= context:
            return None
        messages, tools, counter = request.messages, request.tools, self._counter
        if bound > OFF_LOOP_BYTES:
            prompt = await asyncio.to_thread(counter.prompt, messages, tools, limit=context)
        else:
            prompt = counter.prompt(messages, tools, limit=context)
        stream.prompt_tokens = prompt  # the same count bills the prompt if the upstream reports none
        # An exact count of the context or more was refused above; an estimate (a conversation the
        # template rejects) that says so cuts nothing.
        return context - prompt if prompt < context else None

    async def run(self, request: GenerationRequest, stream: _Stream) -> AsyncGenerator[GenerationEvent, None]:
        assert self._client is not None, "engine not started"
        room = await self._room(request, stream)  # refuses a prompt the context can't hold
        try:
            body = request_body(request, self._model, self._dialect, room=room)
        except UnsupportedField as exc:
            raise InvalidParameter(
                f"{exc.param} is not supported by this model's upstream.", param=exc.param
            ) from None
        content = dumps(body)
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if request.stream else "application/json",
            "X-Request-Id": request.request_id,
        }
        # Past this point the request waits for one of max_concurrency slots (first come, first
        # served), holds it across retries on other replicas, and gives it back as it ends; a client
        # that hangs up while waiting is cancelled out of the queue.
        await self._gate.acquire()
        try:
            tried: set[str] = set()
            last: _Retry | None = None
            while True:
                replica = self._replicas.pick(tried)
                if replica is None:
                    if last is None:
                        log.warning("request %s: no upstream replica available", request.request_id)
                        raise EngineUnavailable(retry_after=self._replicas.retry_after())
                    if isinstance(last.error, EngineUnavailable):
                        last.error.retry_after = self._replicas.retry_after()
                    raise last.error
                tried.add(replica.url)
                replica.outstanding += 1
                try:
                    reader = ChunkReader()
                    stream.reader = reader
                    try:
                        if request.stream:
                            response, events, first = await self._open(replica, content, headers, reader)
                        else:
                            answer = await self._answer(replica, content, headers, reader)
                    except _Retry as exc:
                        detail = replica.scrub(exc.detail)
                        log.warning("request %s: upstream %s: %s", request.request_id, replica.shown, detail)
                        self._errors[replica.index, "before_first_byte" if exc.retry else "refused"] += 1
                        if not exc.retry:
                            raise exc.error from None
                        self._replicas.failed(replica)
                        last = exc
                        continue
                    if not request.stream:
                        # The whole answer, read: the same events a stream would have given, at once.
                        self._replicas.succeeded(replica)
                        for event in answer:
                            yield event
                        usage = reader.usage or stream.count(reader)
                        stream.finished = True
                        yield Finished(reader.finish_reason or "stop", usage)
                        return
                    reusable = False
                    try:
                        for event in first:
                            yield event
                        # The rest of the stream, inline rather than a nested generator: each event
                        # passes one generator frame less (they resume once per upstream chunk).
                        idle = self._config.idle_timeout
                        try:
                            while reader.finish_reason is None or reader.usage is None:
                                payload = await events.next(idle)
                                if payload is None:
                                    break
                                for event in reader.feed(payload):
                                    yield event
                        except (aiohttp.ClientError, OSError, UpstreamProtocolError) as exc:
                            timeout = isinstance(exc, TimeoutError)
                            what = "idle timeout" if timeout else f"{type(exc).__name__}: {exc}"
                            raise self._mid_stream(request.request_id, replica, what) from None
                        if reader.finish_reason is None:
                            raise self._mid_stream(request.request_id, replica, "ended without finishing")
                        reusable = await events.drain()
                    finally:
                        if reusable:
                            response.release()  # read to its end: the connection goes back to the pool
                        else:
                            response.close()  # unread (client gone, failure): dropped, the upstream aborts
                    self._replicas.succeeded(replica)
                    usage = reader.usage or stream.count(reader)
                    stream.finished = True
                    yield Finished(reader.finish_reason or "stop", usage)
                    return
                finally:
                    replica.outstanding -= 1
        finally:
            self._gate.release()

    async def _post(
        self, replica: Replica, content: bytes, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """Send the request to ``replica``; a status other than 200 is a :class:`_Retry` (its body, cut
        short, for the log). The caller closes the response on any failure after this returns."""
        assert self._client is not None
        response = await self._client.post(replica.chat_url, data=content, headers=headers)
        if response.status != 200:
            try:
                body = (await response.read())[:500]
            finally:
                response.close()
            status = response.status
            error = _status_error(status, response.headers.get("Retry-After"))
            raise _Retry(error, f"HTTP {status}: {body!r}", retry=status not in _REFUSED)
        return response

    async def _open(
        self, replica: Replica, content: bytes, headers: dict[str, str], reader: ChunkReader
    ) -> tuple[aiohttp.ClientResponse, EventStream, list[GenerationEvent]]:
        """Send the request and read up to its first event; every failure here is a :class:`_Retry`."""
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(self._config.first_byte_timeout):
                response = await self._post(replica, content, headers)
                events = EventStream(response.content)
                first: list[GenerationEvent] = []
                while not first:
                    payload = await events.next()
                    if payload is None:
                        break  # ended before any event: run finds no finish and fails it
                    first = reader.feed(payload)
                    if reader.finish_reason is not None:
                        break
                return response, events, first
        except BaseException as exc:
            if response is not None:
                response.close()
            mapped = _before_first_byte(exc, "no first event within first_byte_timeout")
            if mapped is exc:
                raise
            raise mapped from None

    async def _answer(
        self, replica: Replica, content: bytes, headers: dict[str, str], reader: ChunkReader
    ) -> list[GenerationEvent]:
        """A non-streamed call: send the request, read the whole answer and turn it into events. Every
        failure here is a :class:`_Retry`: nothing has reached the client yet, so another replica may
        answer instead (and the request is charged once). Cancelled (the client hung up), the
        connection is closed at once, which is how the upstream learns to abort."""
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(self._config.answer_timeout):
                response = await self._post(replica, content, headers)
                raw = await response.read()  # read to its end: the connection goes back to the pool
            if response.content_type == "text/event-stream":
                # Streamed although asked for one answer (some proxies do): the same events.
                events = [e for payload in sse_payloads(raw) for e in reader.feed(payload)]
            else:
                events = reader.answer(loads(raw))
            if reader.finish_reason is None:
                raise UpstreamProtocolError("the answer has no finish_reason")
            return events
        except BaseException as exc:
            if response is not None:
                response.close()
            mapped = _before_first_byte(exc, "no whole answer within answer_timeout")
            if mapped is exc:
                raise
            raise mapped from None

    def _mid_stream(self, request_id: str, replica: Replica, what: str) -> EngineFailure:
        """A stream that failed after its first event: counted against the replica, logged, and the
        error the service sends in-band (the request is charged what was delivered)."""
        self._replicas.failed(replica)
        self._errors[replica.index, "mid_stream"] += 1
        log.warning(
            "request %s: upstream %s failed mid-stream: %s", request_id, replica.shown, replica.scrub(what)
        )
        return EngineFailure()


class DashScopeEngine(OpenAIEngine):
    """DashScope's compatible mode itself: the same code, its region's host and key, its own fields for
    thinking and partial mode (:class:`Dialect`)."""

    config_model: ClassVar[type[OpenAIModelConfig]] = DashScopeModelConfig
    name = "dashscope"


class _Stream:
    """One request's events; :meth:`spent` tells what a stream closed before its end used."""

    __slots__ = ("_engine", "_events", "_request", "finished", "prompt_tokens", "reader")

    def __init__(self, engine: OpenAIEngine, request: GenerationRequest) -> None:
        self._engine = engine
        self._request = request
        self.reader: ChunkReader | None = None
        self.finished = False
        self.prompt_tokens: int | None = None  # counted before sending (OpenAIEngine._room), if it was
        self._events = engine.run(request, self)

    def __aiter__(self) -> _Stream:
        return self

    def __anext__(self) -> Awaitable[GenerationEvent]:
        return self._events.__anext__()  # the generator's own awaitable: no coroutine frame per event

    async def aclose(self) -> None:
        await self._events.aclose()

    def count(self, reader: ChunkReader) -> Usage:
        """Usage counted here: the prompt as rendered, and the text delivered so far."""
        counter = self._engine._counter
        prompt = self.prompt_tokens
        if prompt is None:
            prompt = counter.prompt(self._request.messages, self._request.tools)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=counter.text(reader.delivered),
            reasoning_tokens=counter.text(reader.reasoning),
            counted_locally=True,
        )

    def spent(self) -> Usage | None:
        reader = self.reader
        if self.finished or reader is None or not reader.delivered:
            return None  # finished (it reported its usage) or nothing delivered (nothing charged)
        if reader.usage is not None:
            return reader.usage  # a whole answer read, closed while its events were handed out
        return self.count(reader)


_CONVENTIONAL_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
# The longest wait passed on from an upstream's Retry-After (a bound against a misconfigured upstream).
_MAX_RETRY_AFTER = 300
_REFUSED = frozenset({400, 413, 422})  # the request's fault: not retried, not a replica failure


def _before_first_byte(exc: BaseException, timed_out: str) -> BaseException:
    """What a failure before anything reached the client becomes: a :class:`_Retry` (carrying our
    error) for the upstream's faults; anything else (a cancellation) unchanged."""
    if isinstance(exc, _Retry):
        return exc
    if isinstance(exc, aiohttp.ClientError | UpstreamProtocolError):
        # Before TimeoutError: aiohttp's connect timeout is both.
        return _Retry(EngineUnavailable(), f"{type(exc).__name__}: {exc}")
    if isinstance(exc, TimeoutError):
        return _Retry(EngineUnavailable(), timed_out)
    if isinstance(exc, OSError):
        return _Retry(EngineUnavailable(), f"{type(exc).__name__}: {exc}")
    return exc


def _status_error(status: int, retry_after: str | None = None) -> ApiError:
    """Our error for an upstream's HTTP status before streaming (its message stays in our log). A 429
    is our capacity error, with the upstream's own Retry-After seconds when it gives them (an HTTP
    date or nonsense: 1 s, as our own admission says), so a client backs off as long as the upstream asked."""
    if status == 429:
        # ASCII digits only: str.isdigit() accepts "²", which int() refuses.
        given = retry_after.strip() if retry_after is not None else ""
        seconds = int(given) if re.fullmatch(r"[0-9]{1,6}", given) else 0
        return EngineOverloaded(retry_after=min(max(seconds, 1), _MAX_RETRY_AFTER))
    if status in _REFUSED:
        return InvalidParameter("The upstream model rejected the request.")
    return EngineUnavailable()
