"""LocalEngine: a Hugging Face checkpoint served in-process, one inference thread per engine."""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import os
import threading
from collections.abc import AsyncIterator
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
    Usage,
)
from qwen_gateway.engines.local import loader
from qwen_gateway.engines.local.backends import SchedulerKind, supports_batching
from qwen_gateway.engines.local.detok import TextStream
from qwen_gateway.engines.local.masks import ThinkingBudget, TokenMask
from qwen_gateway.engines.local.options import LocalModelConfig
from qwen_gateway.engines.local.prompt import PromptRenderer
from qwen_gateway.engines.local.sampling import ResolvedSampling, Sampler
from qwen_gateway.engines.local.scheduler import Scheduler
from qwen_gateway.engines.local.sequence import Outgoing, Sequence
from qwen_gateway.engines.local.vision import VisionBuilder, VisionPrompt, has_media
from qwen_gateway.errors import (
    ApiError,
    ContextLengthExceeded,
    EngineFailure,
    EngineUnavailable,
    InvalidParameter,
    StartupError,
)
from qwen_gateway.settings import ModelConfig, Settings, engine_config

log = logging.getLogger(__name__)

# Qwen3's own way to end a reasoning block early: the closing tag on a line of its own, then a blank
# line before the answer.
THINK_END = "</think>"
THINK_CLOSE = "\n</think>\n\n"
# Share of the memory available at start the KV pool may fill before requests are refused.
KV_MEMORY_SHARE = 0.7


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
        self._tokenizer_lock = threading.Lock()  # prompt rendering's tokenizer
        self._decode_lock = threading.Lock()
        self._capabilities = Capabilities(max_context=config.context_length or 0)
        self._think_close: tuple[int, list[int]] | None = None  # (</think> id, close ids)
        self._vision: VisionBuilder | None = None  # for checkpoints that take images

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
        # Rendering gets a tokenizer of its own: a long prompt being tokenized on a worker thread then
        # never holds up decoding, which uses ``loaded.tokenizer`` on the consumer's side.
        self._renderer = PromptRenderer(copy.deepcopy(loaded.tokenizer), self._tokenizer_lock)
        # A configured context_length may only shrink the checkpoint's (e.g. to bound KV-cache memory).
        max_context = min(loaded.max_context, self._config.context_length or loaded.max_context)
        reasoning = "enable_thinking" in template or "<think>" in template
        self._think_close = _think_close_ids(loaded.tokenizer) if reasoning else None
        if loaded.vision is not None:
            self._vision = VisionBuilder(
                loaded.vision, self._renderer.encode, loaded.model.model.get_rope_index
            )
        self._capabilities = Capabilities(
            max_context=max_context,
            max_output=None,
            vision=loaded.vision is not None,
            video=loaded.vision is not None and loaded.vision.video is not None,
            tools="tools" in template,
            reasoning=reasoning,
            thinking_budget=self._think_close is not None,
            max_concurrency=self._config.max_batch_size if kind == "batched" else 1,
        )
        self._scheduler = Scheduler(
            loaded.model,
            device=loaded.device,
            kind=kind,
            max_batch_size=self._config.max_batch_size,
            name=self._config.id,
            prefill_chunk=self._config.prefill_chunk,
            kv_capacity_tokens=self._config.max_batch_size * max_context,
            kv_budget_tokens=_kv_budget_tokens(loaded),
        )
        self._scheduler.start()
        self._state = EngineState.READY

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        scheduler, loaded, renderer = self._ready()
        if request.constraint is not None:
            # Capabilities.constraints is empty: the service refuses these before calling; say so
            # here too instead of ignoring the constraint.
            raise InvalidParameter("This model does not support constrained output.", param="response_format")
        max_context = self._capabilities.max_context
        vision: VisionPrompt | None = None
        try:
            if has_media(request):
                vision = await asyncio.to_thread(self._render_vision, request, renderer, max_context)
                prompt_ids = vision.ids
            else:
                prompt_ids = await asyncio.to_thread(renderer.render, request, max_context)
        except ApiError:
            raise
        except Exception:
            log.exception("rendering the prompt of request %s failed", request.request_id)
            raise EngineFailure("inference internal error.") from None
        seq, outbox = self._sequence(request, prompt_ids, loaded, vision)
        text = TextStream(_Decoder(loaded.tokenizer, self._decode_lock), prompt_ids, request.sampling.stop)
        prompt_tokens = len(prompt_ids)
        # What the media took of the prompt (the same layouts built the prompt: see media/tokens.py).
        media = {"image_tokens": vision.image_tokens, "video_tokens": vision.video_tokens} if vision else {}

        def usage(completion: int) -> Usage:
            return Usage(prompt_tokens, completion, **media)

        scheduler.submit(seq)
        try:
            while True:
                items = [await outbox.get()]
                # A consumer slower than the model gets what piled up as one delta.
                while not outbox.empty():
                    items.append(outbox.get_nowait())
                delta, done = "", None
                count = 0
                for item in items:
                    if isinstance(item, BaseException):
                        if delta:
                            yield TextDelta(delta, usage=usage(count))
                        raise item
                    count = item.completion_tokens
                    delta += text.push(item.ids)
                    if text.stopped:
                        done = Finished("stop", usage(count))
                        break
                    if item.finish is not None:
                        delta += text.flush()
                        reason = "stop" if text.stopped else item.finish
                        done = Finished(reason, usage(count))
                        break
                if delta:
                    yield TextDelta(delta, usage=usage(count))
                if done is not None:
                    yield done
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

    def _token_masks(self, request: GenerationRequest) -> list[TokenMask]:
        """The request's typed fields compiled into token masks for the batch bitmask."""
        masks: list[TokenMask] = []
        thinking = request.thinking
        if thinking is not None and thinking.enabled and thinking.budget is not None:
            if self._think_close is None:
                raise InvalidParameter(
                    "This model does not support thinking_budget.", param="thinking_budget"
                )
            end_id, close_ids = self._think_close
            masks.append(ThinkingBudget(thinking.budget, end_id, close_ids))
        return masks

    def _render_vision(
        self, request: GenerationRequest, renderer: PromptRenderer, max_context: int
    ) -> VisionPrompt:
        """A prompt with images or video: the template's text, expanded and tokenized (blocking)."""
        if self._vision is None:
            raise InvalidParameter("This model does not support image or video input.", param="messages")
        prompt = self._vision.build(request, renderer.render_text(request))
        if not prompt.ids or len(prompt.ids) >= max_context:
            raise ContextLengthExceeded(
                f"Range of input length should be [1, {max_context - 1}]", param="messages"
            )
        return prompt

    def _sequence(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        loaded: loader.LoadedModel,
        vision: VisionPrompt | None = None,
    ) -> tuple[Sequence, asyncio.Queue[Outgoing]]:
        max_context = self._capabilities.max_context
        sampling = request.sampling
        # Never run past the model's context: the answer is cut with "length" instead.
        max_new = max(1, min(sampling.max_tokens, max_context - len(prompt_ids)))
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[Outgoing] = asyncio.Queue()

        def emit(item: Outgoing) -> None:
            loop.call_soon_threadsafe(outbox.put_nowait, item)

        seq = Sequence(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            sampler=Sampler(
                ResolvedSampling.resolve(sampling, loaded.defaults), prompt_ids, exempt=loaded.eos_ids
            ),
            eos_ids=loaded.eos_ids,
            stop_token_ids=sampling.stop_token_ids,
            emit=emit,
            masks=self._token_masks(request),
            rope_delta=vision.row.rope_delta if vision is not None else 0,
            vision=vision.row if vision is not None else None,
        )
        return seq, outbox


class _Decoder:
    """Decoding runs on the consumer's event loop with the loaded tokenizer; the lock only guards
    against two event loops sharing one engine (prompt rendering has its own tokenizer)."""

    def __init__(self, tokenizer: Any, lock: threading.Lock) -> None:
        self._tokenizer = tokenizer
        self._lock = lock

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        with self._lock:
            return str(self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))


def _think_close_ids(tokenizer: Any) -> tuple[int, list[int]] | None:
    """(id of ``</think>``, ids of the forced close) when ``</think>`` is one token of the vocabulary."""
    end = tokenizer.convert_tokens_to_ids(THINK_END)
    if not isinstance(end, int) or end == tokenizer.unk_token_id:
        return None
    close = [int(i) for i in tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"]]
    return (end, close) if end in close else None


def _kv_budget_tokens(loaded: loader.LoadedModel) -> int | None:
    """Tokens the KV pool may hold: a share of the memory available now (None: unknown)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    config = getattr(loaded.model.config, "text_config", None) or loaded.model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    itemsize = torch_itemsize(loaded.dtype)
    per_token = 2 * int(config.num_hidden_layers) * kv_heads * head_dim * itemsize
    return max(1, int(available * KV_MEMORY_SHARE) // per_token)


def torch_itemsize(dtype: Any) -> int:
    return int(getattr(dtype, "itemsize", 4))
