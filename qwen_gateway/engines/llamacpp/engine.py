"""LlamaCppEngine: a GGUF checkpoint served in-process by llama.cpp, several sequences per decode."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator

from rich.console import Console
from rich.markup import escape

from qwen_gateway.engines.base import (
    Capabilities,
    EngineHealth,
    EngineState,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
    Usage,
)
from qwen_gateway.engines.llamacpp.model import ContextShape, GgufModel
from qwen_gateway.engines.llamacpp.options import LlamaCppModelConfig
from qwen_gateway.engines.llamacpp.scheduler import Scheduler
from qwen_gateway.engines.llamacpp.sequence import Outgoing, Sequence
from qwen_gateway.engines.llamacpp.source import resolve_gguf
from qwen_gateway.engines.llamacpp.tokenizer import GgufTokenizer
from qwen_gateway.engines.local import chat_template
from qwen_gateway.engines.local.chat_template import tool_format
from qwen_gateway.engines.local.detok import TextStream, marked
from qwen_gateway.engines.local.prompt import PromptRenderer
from qwen_gateway.engines.rules import GenerationDefaults, ResolvedSampling, ThinkingBudget
from qwen_gateway.errors import ApiError, EngineFailure, EngineUnavailable, InvalidParameter, StartupError
from qwen_gateway.settings import ModelConfig, Settings, engine_config

log = logging.getLogger(__name__)

THINK_END = "</think>"
# Without kv_cache_tokens, the cache holds max_batch_size full contexts, up to this many cells.
DEFAULT_KV_TOKENS_CAP = 16384
# Final counts kept for generations closed early, until the service asks (each id is asked once; the
# cap bounds what callers that never ask leave behind), and how long asking may wait for one.
EARLY_REPORTS = 1024
EARLY_REPORT_WAIT = 30.0


class LlamaCppEngine:
    """The ``llamacpp`` engine (see scheduler.py for how requests share the model)."""

    name = "llamacpp"
    config_model = LlamaCppModelConfig

    def __init__(self, config: ModelConfig, *, settings: Settings, console: Console | None = None) -> None:
        self._config = engine_config(config, LlamaCppModelConfig)
        self._settings = settings
        self._console = console or Console(stderr=True, soft_wrap=True)
        self._state = EngineState.LOADING
        self._detail: str | None = None
        self._model: GgufModel | None = None
        self._scheduler: Scheduler | None = None
        self._renderer: PromptRenderer | None = None
        self._tokenizer: GgufTokenizer | None = None
        self._capabilities = Capabilities(max_context=config.context_length or 0)
        self._think_close: tuple[list[int], list[int]] | None = None
        self._specials: dict[int, str] = {}
        self._defaults = GenerationDefaults()
        self._early: dict[str, tuple[Sequence, int]] = {}

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def scheduler(self) -> Scheduler | None:
        return self._scheduler

    async def start(self) -> None:
        if self._state is not EngineState.LOADING or self._model is not None:
            raise StartupError(f"model {self._config.id!r}: the engine was already started")
        started = time.monotonic()
        try:
            path = await asyncio.to_thread(resolve_gguf, self._config, self._settings, self._console)
            # The template renderer's import takes seconds on a busy CPU: paid beside the load.
            warm = asyncio.create_task(asyncio.to_thread(chat_template.warm_up))
            model = await asyncio.to_thread(GgufModel, path)
            await warm
        except StartupError as exc:
            self._state, self._detail = EngineState.FAILED, str(exc)
            raise
        template = model.chat_template
        if not template:
            model.close()
            raise StartupError(f"model {self._config.id!r}: {path.name} carries no chat template")
        config = self._config
        train = model.n_ctx_train or 4096
        kv_tokens = config.kv_cache_tokens or min(config.max_batch_size * train, DEFAULT_KV_TOKENS_CAP)
        # A configured context_length may only shrink the model's, and one answer can't outgrow the cache.
        max_context = min(train, config.context_length or train, kv_tokens)
        shape = ContextShape(
            kv_tokens=kv_tokens,
            max_sequences=config.max_batch_size,
            batch_tokens=config.prefill_chunk,
            threads=config.threads or default_threads(),
        )
        self._model = model
        self._tokenizer = GgufTokenizer(model, template)
        self._renderer = PromptRenderer(self._tokenizer, threading.Lock())
        self._think_close = (
            model.tokenize(THINK_END),
            [*model.tokenize("\n"), *model.tokenize(THINK_END), *model.tokenize("\n\n")],
        )
        self._specials = {i: t for t, i in model.special_tokens.items()}
        self._defaults = model.sampling_defaults()
        self._capabilities = Capabilities(
            max_context=max_context,
            max_output=None,
            tools="tools" in template,
            reasoning="enable_thinking" in template or "<think>" in template,
            thinking_budget=True,
            # Not yet compiled for llama.cpp: the service refuses JSON-schema / forced-tool requests
            # with a 400 naming the parameter, and logprobs likewise.
            constraints=frozenset(),
            logprobs=False,
            max_concurrency=config.max_batch_size,
            special_tokens=dict(model.special_tokens),
            tool_format=tool_format(template),
            reasoning_format="qwen3",
        )
        scheduler = Scheduler(model, shape, name=config.id, prefix_cache=config.prefix_cache)
        try:
            await asyncio.to_thread(scheduler.start)
        except StartupError as exc:
            self._state, self._detail = EngineState.FAILED, str(exc)
            raise
        self._scheduler = scheduler
        self._state = EngineState.READY
        self._console.print(
            f"[green]✓[/] {escape(config.id)}: {escape(path.name)} on llama.cpp "
            f"({max_context} tokens of context, {config.max_batch_size} sequences, "
            f"{kv_tokens} KV cells) in {time.monotonic() - started:.1f} s",
            highlight=False,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        scheduler, model, renderer = self._ready()
        if request.constraint is not None:  # the service checks Capabilities.constraints first
            raise InvalidParameter("This model does not support constrained output.", param="response_format")
        if request.sampling.logprobs is not None:
            raise InvalidParameter("This model does not return logprobs.", param="logprobs")
        max_context = self._capabilities.max_context
        try:
            prompt_ids = await asyncio.to_thread(renderer.render, request, max_context)
        except ApiError:
            raise
        except Exception:
            log.exception("rendering the prompt of request %s failed", request.request_id)
            raise EngineFailure("inference internal error.") from None
        seq, outbox = self._sequence(request, prompt_ids, model)
        text = TextStream(model, prompt_ids, request.sampling.stop, self._specials)
        prompt_tokens = len(prompt_ids)
        scheduler.submit(seq)
        try:
            while True:
                items = [await outbox.get()]
                while not outbox.empty():  # a slow consumer gets what piled up as one delta
                    items.append(outbox.get_nowait())
                delta, done = "", None
                specials: list[tuple[int, int]] = []
                count = reasoning = 0
                for item in items:
                    if isinstance(item, BaseException):
                        if delta:
                            yield TextDelta(delta, Usage(prompt_tokens, count, reasoning), tuple(specials))
                        raise item
                    count, reasoning = item.completion_tokens, item.reasoning_tokens
                    delta += marked(text, text.push(item.ids), specials, len(delta))
                    if text.stopped:
                        done = Finished("stop", Usage(prompt_tokens, count, reasoning))
                        break
                    if item.finish is not None:
                        delta += marked(text, text.flush(), specials, len(delta))
                        reason = "stop" if text.stopped else item.finish
                        done = Finished(reason, Usage(prompt_tokens, count, reasoning))
                        break
                if delta:
                    yield TextDelta(delta, Usage(prompt_tokens, count, reasoning), tuple(specials))
                if done is not None:
                    yield done
                    return
        finally:
            if not seq.finished:
                seq.cancel()
                scheduler.wake()
                # Closed before its end: cancelled_usage gives the final count once the inference
                # thread has let the sequence go (a token may be chosen after the last one read).
                self._early[request.request_id] = (seq, prompt_tokens)
                while len(self._early) > EARLY_REPORTS:
                    self._early.pop(next(iter(self._early)))

    async def cancelled_usage(self, request_id: str) -> Usage | None:
        entry = self._early.pop(request_id, None)
        if entry is None:
            return None
        seq, prompt_tokens = entry
        if not await asyncio.to_thread(seq.retired.wait, EARLY_REPORT_WAIT):
            log.warning("request %s: no final count from llama.cpp in %ss", request_id, EARLY_REPORT_WAIT)
            return None
        generated = len(seq.generated)
        log.info(
            "request %s stopped early: %d prompt and %d generated tokens",
            request_id,
            prompt_tokens,
            generated,
        )
        return Usage(prompt_tokens, generated, seq.reasoning_tokens)

    async def health(self) -> EngineHealth:
        scheduler = self._scheduler
        if self._state is EngineState.READY and scheduler is not None and not scheduler.alive:
            error = scheduler.error
            self._state = EngineState.FAILED
            self._detail = f"the inference thread stopped: {type(error).__name__ if error else 'exited'}"
        # Running only: the requests waiting behind them are /health's `queued` (the service's count).
        active = scheduler.running if scheduler is not None else 0
        return EngineHealth(self._state, active, detail=self._detail)

    async def aclose(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        self._state = EngineState.CLOSED
        if scheduler is not None:
            await asyncio.to_thread(scheduler.stop)
        model, self._model = self._model, None
        if model is not None and (scheduler is None or not scheduler.alive):
            model.close()
        self._renderer = None

    # -- internals -------------------------------------------------------------------------------------

    def _ready(self) -> tuple[Scheduler, GgufModel, PromptRenderer]:
        if (
            self._state is not EngineState.READY
            or self._scheduler is None
            or self._model is None
            or self._renderer is None
            or not self._scheduler.alive
        ):
            raise EngineUnavailable()
        return self._scheduler, self._model, self._renderer

    def _sequence(
        self, request: GenerationRequest, prompt_ids: list[int], model: GgufModel
    ) -> tuple[Sequence, asyncio.Queue[Outgoing]]:
        sampling = request.sampling
        room = max(1, self._capabilities.max_context - len(prompt_ids))
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[Outgoing] = asyncio.Queue()

        def emit(item: Outgoing) -> None:
            loop.call_soon_threadsafe(outbox.put_nowait, item)

        thinking = None
        if request.thinking is not None and request.thinking.enabled and self._think_close is not None:
            end_ids, close_ids = self._think_close
            thinking = ThinkingBudget(min(request.thinking.budget or room, room), end_ids, close_ids)
        seq = Sequence(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            max_new_tokens=min(sampling.max_tokens, room),
            # A thinking request's answer cap excludes its reasoning: the context bounds the whole.
            max_total_tokens=room if thinking is not None else min(sampling.max_tokens, room),
            sampling=ResolvedSampling.resolve(sampling, self._defaults),
            eos_ids=model.eog_ids,
            stop_token_ids=sampling.stop_token_ids,
            emit=emit,
            thinking=thinking,
        )
        return seq, outbox


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set (the usual knob on shared hosts; the test suite sets it to 1 per
    worker), else every CPU this process may use. Measured on the 2-CPU dev VM against llama.cpp's own
    llama-server on SmolLM2 Q4_1 (benchmarks/bench_llamacpp.py): with half the CPUs our server made
    59 % of its tokens/s at one stream, with all of them 98 %. More threads than CPUs spin at each
    step's barrier, so the default never goes past the CPUs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    wanted = os.environ.get("OMP_NUM_THREADS", "").strip()
    if wanted.isdigit() and int(wanted) > 0:
        return min(int(wanted), max(1, cpus))
    return max(1, cpus)
