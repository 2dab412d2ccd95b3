"""LocalEngine: a Hugging Face checkpoint served in-process, one inference thread per engine."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as SequenceABC
from typing import Any

from rich.console import Console

from qwen_gateway.engines.base import (
    Capabilities,
    EngineHealth,
    EngineState,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
)
from qwen_gateway.engines.local import loader
from qwen_gateway.engines.local.backends import SchedulerKind, supports_batching
from qwen_gateway.engines.local.detok import IncrementalDetokenizer
from qwen_gateway.engines.local.options import LocalModelConfig
from qwen_gateway.engines.local.prompt import PromptRenderer
from qwen_gateway.engines.local.sampling import ResolvedSampling, Sampler
from qwen_gateway.engines.local.scheduler import Scheduler
from qwen_gateway.engines.local.sequence import LogitsProcessor, Outgoing, Sequence
from qwen_gateway.errors import (
    ApiError,
    ContextLengthExceeded,
    EngineFailure,
    EngineUnavailable,
    StartupError,
)
from qwen_gateway.settings import ModelConfig, Settings, engine_config

log = logging.getLogger(__name__)


# Internal hook (not part of engines/base.py): builds a request's logits processors, for constrained
# decoding and thinking budgets. It runs on the event loop before the request is queued.
ProcessorFactory = Callable[[GenerationRequest, Any], SequenceABC[LogitsProcessor]]


class LocalEngine:
    """The ``local`` engine. ``scheduler`` picks how concurrent requests share the model
    (``batched`` or ``interleaved``); ``None`` takes the model's config (``LocalModelConfig.scheduler``)."""

    name = "local"
    # The options this engine takes in a [[models]] entry (see engines/registry.py).
    config_model = LocalModelConfig

    def __init__(
        self,
        config: ModelConfig,
        *,
        settings: Settings,
        scheduler: SchedulerKind | None = None,
        console: Console | None = None,
    ) -> None:
        self._config = engine_config(config, LocalModelConfig)
        self._settings = settings
        self._console = console or Console(stderr=True, soft_wrap=True)
        self._scheduler_kind: SchedulerKind = scheduler or self._config.scheduler
        self._state = EngineState.LOADING
        self._detail: str | None = None
        self._loaded: loader.LoadedModel | None = None
        self._scheduler: Scheduler | None = None
        self._renderer: PromptRenderer | None = None
        self._tokenizer_lock = threading.Lock()
        self._capabilities = Capabilities(max_context=config.context_length or 0)
        self.processor_factory: ProcessorFactory | None = None

    # -- Engine protocol -------------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        """Known once :meth:`start` has loaded the checkpoint (before: a placeholder)."""
        return self._capabilities

    @property
    def scheduler_kind(self) -> SchedulerKind:
        return self._scheduler.kind if self._scheduler is not None else self._scheduler_kind

    async def start(self) -> None:
        if self._state is not EngineState.LOADING or self._loaded is not None:
            raise StartupError(f"model {self._config.id!r}: the engine was already started")
        try:
            loaded = await asyncio.to_thread(loader.load, self._config, self._settings, self._console)
        except StartupError as exc:
            self._state, self._detail = EngineState.FAILED, str(exc)
            raise
        kind = self._scheduler_kind
        if kind == "batched" and not supports_batching(loaded.model):
            kind = "interleaved"  # hybrid/sliding-window caches can't be left-padded
        template = loaded.chat_template
        self._loaded = loaded
        self._renderer = PromptRenderer(loaded.tokenizer, self._tokenizer_lock)
        # A configured context_length may only shrink the checkpoint's (e.g. to bound KV-cache memory).
        max_context = min(loaded.max_context, self._config.context_length or loaded.max_context)
        self._capabilities = Capabilities(
            max_context=max_context,
            max_output=None,
            tools="tools" in template,
            reasoning="enable_thinking" in template or "<think>" in template,
            max_concurrency=self._config.max_batch_size if kind == "batched" else 1,
        )
        self._scheduler = Scheduler(
            loaded.model,
            device=loaded.device,
            kind=kind,
            max_batch_size=self._config.max_batch_size,
            name=self._config.id,
            prefill_chunk=self._config.prefill_chunk,
        )
        self._scheduler.start()
        self._state = EngineState.READY

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        scheduler, loaded, renderer = self._ready()
        try:
            prompt_ids = await asyncio.to_thread(renderer.render, request)
        except ApiError:
            raise
        except Exception:
            log.exception("rendering the prompt of request %s failed", request.request_id)
            raise EngineFailure("inference internal error.") from None
        seq, outbox = self._sequence(request, prompt_ids, loaded)
        scheduler.submit(seq)
        try:
            pending: Outgoing | None = None
            while True:
                item = pending if pending is not None else await outbox.get()
                pending = None
                if isinstance(item, TextDelta):
                    # A consumer slower than the model gets what piled up as one delta.
                    while not outbox.empty():
                        nxt = outbox.get_nowait()
                        if not isinstance(nxt, TextDelta):
                            pending = nxt
                            break
                        item = TextDelta(item.text + nxt.text, usage=nxt.usage)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            if not seq.finished:
                seq.cancel()
                scheduler.wake()

    async def health(self) -> EngineHealth:
        scheduler = self._scheduler
        if self._state is EngineState.READY and scheduler is not None and not scheduler.alive:
            self._state, self._detail = EngineState.FAILED, "the inference thread stopped"
        active = scheduler.held if scheduler is not None else 0
        return EngineHealth(self._state, active, detail=self._detail)

    async def aclose(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        self._state = EngineState.CLOSED
        if scheduler is not None:
            await asyncio.to_thread(scheduler.stop)
        self._loaded = None
        self._renderer = None
        gc.collect()

    # -- internals -------------------------------------------------------------------------------------

    def _ready(self) -> tuple[Scheduler, loader.LoadedModel, PromptRenderer]:
        if (
            self._state is not EngineState.READY
            or self._scheduler is None
            or self._loaded is None
            or self._renderer is None
            or not self._scheduler.alive
        ):
            raise EngineUnavailable()
        return self._scheduler, self._loaded, self._renderer

    def _sequence(
        self, request: GenerationRequest, prompt_ids: list[int], loaded: loader.LoadedModel
    ) -> tuple[Sequence, asyncio.Queue[Outgoing]]:
        max_context = self._capabilities.max_context
        if not prompt_ids or len(prompt_ids) >= max_context:
            raise ContextLengthExceeded(
                f"Range of input length should be [1, {max_context - 1}]", param="messages"
            )
        sampling = request.sampling
        # Never run past the model's context: the answer is cut with "length" instead.
        max_new = max(1, min(sampling.max_tokens, max_context - len(prompt_ids)))
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[Outgoing] = asyncio.Queue()

        def emit(item: Outgoing) -> None:
            loop.call_soon_threadsafe(outbox.put_nowait, item)

        processors = self.processor_factory(request, loaded.tokenizer) if self.processor_factory else ()
        seq = Sequence(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            sampler=Sampler(ResolvedSampling.resolve(sampling, loaded.defaults), prompt_ids),
            detokenizer=IncrementalDetokenizer(
                _LockedDecoder(loaded.tokenizer, self._tokenizer_lock), prompt_ids
            ),
            eos_ids=loaded.eos_ids,
            stop=sampling.stop,
            stop_token_ids=sampling.stop_token_ids,
            emit=emit,
            logits_processors=processors,
        )
        return seq, outbox


class _LockedDecoder:
    """Decoding on the inference thread shares the tokenizer with prompt rendering on worker threads."""

    def __init__(self, tokenizer: Any, lock: threading.Lock) -> None:
        self._tokenizer = tokenizer
        self._lock = lock

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        with self._lock:
            return str(self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))
