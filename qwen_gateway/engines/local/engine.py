"""LocalEngine: a Hugging Face checkpoint served in-process, one inference thread per engine."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console

from qwen_gateway.engines.base import (
    Capabilities,
    EngineHealth,
    EngineState,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
    Usage,
)
from qwen_gateway.engines.local import constraints, loader
from qwen_gateway.engines.local.backends import SchedulerKind, supports_batching
from qwen_gateway.engines.local.chat_template import tool_format
from qwen_gateway.engines.local.constraints import GrammarState
from qwen_gateway.engines.local.detok import TextStream, TokenText, marked
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

if TYPE_CHECKING:
    from qwen_gateway.engines.registry import SharedLoads

log = logging.getLogger(__name__)

# Qwen3's own way to end a reasoning block early: the closing tag on a line of its own, then a blank
# line before the answer.
THINK_END = "</think>"
# Share of the memory available at start the KV pool may fill before requests are refused.
KV_MEMORY_SHARE = 0.7
# Final usage of cancelled generations kept for cancelled_usage(): the service asks at once; the bound
# only keeps callers that never ask (benchmarks, tests) from growing the table.
CANCELLED_KEPT = 1024
# How long cancelled_usage() waits for the inference thread to drop a cancelled sequence (it does so
# at its next step; only a hung or very long step takes longer, and then the last usage seen counts).
CANCEL_REPORT_TIMEOUT = 30.0


class LocalEngine:
    """The ``local`` engine. ``scheduler`` picks how concurrent requests share the model
    (``batched`` or ``interleaved``); ``None`` takes the model's config (``LocalModelConfig.scheduler``)."""

    name = "local"
    # The options this engine takes in a [[models]] entry (see engines/registry.py).
    config_model = LocalModelConfig
    # Takes the registry's SharedLoads: entries on one checkpoint share its tokenizers (loader.Tokenizers)
    # and its grammar compiler (constraints.CompiledGrammars).
    shares_loads = True

    def __init__(
        self,
        config: ModelConfig,
        *,
        settings: Settings,
        scheduler: SchedulerKind | None = None,
        console: Console | None = None,
        shared: SharedLoads | None = None,
    ) -> None:
        self._config = engine_config(config, LocalModelConfig)
        self._shared = shared
        self._settings = settings
        self._console = console or Console(stderr=True, soft_wrap=True)
        self._scheduler_kind: SchedulerKind = scheduler or self._config.scheduler
        self._state = EngineState.LOADING
        self._detail: str | None = None
        self._loaded: loader.LoadedModel | None = None
        self._scheduler: Scheduler | None = None
        self._renderer: PromptRenderer | None = None
        # The locks of the checkpoint's tokenizers (loader.Tokenizers), set once they are loaded.
        self._decode_lock = threading.Lock()
        self._capabilities = Capabilities(max_context=config.context_length or 0)
        self._think_close: tuple[list[int], list[int]] | None = None  # (</think> ids, close ids)
        self._specials: dict[int, str] = {}  # special token id -> its text
        self._grammars: constraints.Grammars | None = None
        self._token_text: TokenText | None = None
        self._vision: VisionBuilder | None = None  # for checkpoints that take images
        # request id -> the usage of a generation its consumer closed early, once final.
        self._cancelled: collections.OrderedDict[str, asyncio.Future[Usage]] = collections.OrderedDict()

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
            loaded = await asyncio.to_thread(
                loader.load, self._config, self._settings, self._console, self._shared
            )
        except StartupError as exc:
            self._state, self._detail = EngineState.FAILED, str(exc)
            raise
        kind = self._scheduler_kind
        if kind == "batched" and not supports_batching(loaded.model):
            kind = "interleaved"  # hybrid/sliding-window caches can't be left-padded
        template = loaded.chat_template
        self._loaded = loaded
        # Rendering has a tokenizer of its own: a long prompt being tokenized on a worker thread then
        # never holds up decoding, which uses ``loaded.tokenizer`` on the consumer's side. Each comes
        # with its lock, shared with the other engines on this checkpoint that share the tokenizer.
        tokenizers = loaded.tokenizers
        self._decode_lock = tokenizers.decode_lock
        self._renderer = PromptRenderer(tokenizers.render, tokenizers.render_lock)
        # A configured context_length may only shrink the checkpoint's (e.g. to bound KV-cache memory).
        max_context = min(loaded.max_context, self._config.context_length or loaded.max_context)
        reasoning = "enable_thinking" in template or "<think>" in template
        # Any checkpoint can think: one without markup of its own gets "<think>" opened in its
        # generation prompt (PromptRenderer), and the close is forced at the budget either way.
        with self._decode_lock:  # (another engine on this checkpoint may be decoding with it)
            self._think_close = _think_close_ids(loaded.tokenizer)
            special_tokens = {str(k): int(v) for k, v in loaded.tokenizer.get_added_vocab().items()}
        self._specials = {i: t for t, i in special_tokens.items()}
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
            thinking_budget=True,
            constraints=constraints.KINDS,
            logprobs=True,
            max_concurrency=self._config.max_batch_size if kind == "batched" else 1,
            special_tokens=special_tokens,
            tool_format=tool_format(template),
            reasoning_format="qwen3",
        )
        vocab = _vocab_size(loaded.model)
        if constraints.KINDS:
            self._grammars = self._make_grammars(loaded, vocab)
        self._token_text = TokenText(loaded.tokenizer, self._decode_lock)
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

    def _make_grammars(self, loaded: loader.LoadedModel, vocab: int) -> constraints.Grammars:
        """This engine's constraints, over the checkpoint's compiler: shared with the other entries
        on it (SharedLoads, keyed like its tokenizers plus what the compiler depends on), else its own."""
        stop_ids = sorted(loaded.eos_ids)

        def make() -> constraints.CompiledGrammars:
            # (Nothing is read from the tokenizer until the first constrained request.)
            return constraints.CompiledGrammars(loaded.tokenizer, vocab, stop_ids)

        if self._shared is None:
            compiled = make()
        else:
            key = ("local-grammars", loaded.source, vocab, tuple(stop_ids))
            compiled, _owner = self._shared.get_or_load(key, self._config.id, make)
        with self._decode_lock:
            return constraints.Grammars(loaded.tokenizer, compiled)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        scheduler, loaded, renderer = self._ready()
        grammar: GrammarState | None = None
        if request.constraint is not None:
            if self._grammars is None:  # the service checks Capabilities.constraints first
                raise InvalidParameter(
                    "This model does not support constrained output.", param="response_format"
                )
            # Compiling takes tens of milliseconds (cached after): a worker thread, never the loop
            # or the inference thread.
            grammar = await asyncio.to_thread(self._grammars.compile, request.constraint, request.tools)
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
        seq, outbox = self._sequence(request, prompt_ids, loaded, grammar, vision)
        token_text = self._token_text
        text = TextStream(
            _Decoder(loaded.tokenizer, self._decode_lock), prompt_ids, request.sampling.stop, self._specials
        )
        prompt_tokens = len(prompt_ids)
        # What the media took of the prompt (the same layouts built the prompt: see media/tokens.py).
        image_tokens, video_tokens = (vision.image_tokens, vision.video_tokens) if vision else (0, 0)

        def usage_of(completion: int, reasoning: int) -> Usage:
            return Usage(
                prompt_tokens, completion, reasoning, image_tokens=image_tokens, video_tokens=video_tokens
            )

        scheduler.submit(seq)
        complete = False  # the consumer got the Finished event or the error
        try:
            while True:
                items = [await outbox.get()]
                # A consumer slower than the model gets what piled up as one delta.
                while not outbox.empty():
                    items.append(outbox.get_nowait())
                delta, done = "", None
                specials: list[tuple[int, int]] = []
                count = reasoning = 0
                logprobs: list[TokenLogprob] = []
                for item in items:
                    if isinstance(item, BaseException):
                        if delta:
                            usage = usage_of(count, reasoning)
                            yield TextDelta(delta, usage, tuple(specials), tuple(logprobs))
                        complete = True
                        raise item
                    count, reasoning = item.completion_tokens, item.reasoning_tokens
                    if item.logprobs and token_text is not None:
                        logprobs.extend(token_text.logprobs(item.ids, item.logprobs))
                    delta += marked(text, text.push(item.ids), specials, len(delta))
                    if text.stopped:
                        done = Finished("stop", usage_of(count, reasoning))
                        break
                    if item.finish is not None:
                        delta += marked(text, text.flush(), specials, len(delta))
                        reason = "stop" if text.stopped else item.finish
                        done = Finished(reason, usage_of(count, reasoning))
                        break
                if delta or logprobs:
                    usage = usage_of(count, reasoning)
                    yield TextDelta(delta, usage, tuple(specials), tuple(logprobs))
                if done is not None:
                    complete = True
                    yield done
                    return
        finally:
            if not complete:
                self._report_when_stopped(request.request_id, seq, usage_of)
            if not seq.finished:
                seq.cancel()
                scheduler.wake()

    async def cancelled_usage(self, request_id: str) -> Usage | None:
        """The prompt (once its prefill began) plus every token the sequence generated, read when
        the inference thread has dropped it; None for an id not cancelled here (or already asked)."""
        future = self._cancelled.pop(request_id, None)
        if future is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(future), CANCEL_REPORT_TIMEOUT)
        except TimeoutError:
            log.warning(
                "request %s: no final token count %.0f s after cancelling", request_id, CANCEL_REPORT_TIMEOUT
            )
            return None

    def _report_when_stopped(
        self, request_id: str, seq: Sequence, usage_of: Callable[[int, int], Usage]
    ) -> None:
        """Keep the final usage of a generation closed early, for :meth:`cancelled_usage`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Usage] = loop.create_future()
        self._cancelled[request_id] = future
        while len(self._cancelled) > CANCELLED_KEPT:
            self._cancelled.popitem(last=False)

        def stopped() -> None:  # any thread; the sequence's counts are final now
            usage = usage_of(len(seq.generated), seq.reasoning_tokens)
            if not seq.prefilled and not seq.generated:  # still queued: nothing was computed
                usage = Usage(0, 0)
            log.info(
                "request %s stopped early: %d prompt and %d generated tokens",
                request_id,
                usage.prompt_tokens,
                usage.completion_tokens,
            )
            # A closed event loop raises: nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future, usage)

        seq.when_stopped(stopped)

    async def health(self) -> EngineHealth:
        scheduler = self._scheduler
        if self._state is EngineState.READY and scheduler is not None and not scheduler.alive:
            self._state, self._detail = EngineState.FAILED, "the inference thread stopped"
        # Running only: the requests waiting behind them are /health's `queued` (the service's count).
        active = scheduler.running if scheduler is not None else 0
        return EngineHealth(self._state, active, detail=self._detail)

    async def aclose(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        self._state = EngineState.CLOSED
        if scheduler is not None:
            await asyncio.to_thread(scheduler.stop)
            del scheduler  # (it holds the model)
        weights = weakref.ref(self._loaded.model) if self._loaded is not None else None
        self._loaded = None
        self._renderer = None
        self._vision = None  # (it holds the model's rope-index method)
        # Finished sequences drop their callbacks, so the weights usually go with the last reference.
        # A full collection (0.3 s and more in a process holding torch and transformers) only when
        # something still holds them: a reference cycle, or another engine sharing the checkpoint.
        if weights is not None and weights() is not None:
            gc.collect()

    def tokenize(self, text: str) -> list[tuple[int, str]]:
        """:class:`~qwen_gateway.engines.base.Tokenizes`: the checkpoint's own tokenizer on ``text``."""
        _, _, renderer = self._ready()
        return renderer.tokens(text)

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
        """The request's typed fields compiled into token masks for the batch bitmask (the thinking
        budget is the sequence's own, see :meth:`_thinking`)."""
        return []

    def _thinking(self, request: GenerationRequest, room: int) -> ThinkingBudget | None:
        """The reasoning block of a thinking request, bounded by its budget (or the context's room)."""
        thinking = request.thinking
        if thinking is None or not thinking.enabled or self._think_close is None:
            return None
        end_ids, close_ids = self._think_close
        budget = min(thinking.budget or room, room)
        return ThinkingBudget(budget, end_ids, close_ids)

    def _render_vision(
        self, request: GenerationRequest, renderer: PromptRenderer, max_context: int
    ) -> VisionPrompt:
        """A prompt with images or video: the template's text, expanded and tokenized (blocking)."""
        if self._vision is None:
            raise InvalidParameter("This model does not support image or video input.", param="messages")
        prompt = self._vision.build(request, renderer.render_text(request))
        if not prompt.ids or len(prompt.ids) >= max_context:
            raise ContextLengthExceeded.input_range(max_context)
        return prompt

    def _sequence(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        loaded: loader.LoadedModel,
        grammar: GrammarState | None = None,
        vision: VisionPrompt | None = None,
    ) -> tuple[Sequence, asyncio.Queue[Outgoing]]:
        max_context = self._capabilities.max_context
        sampling = request.sampling
        # Never run past the model's context: the answer is cut with "length" instead.
        room = max(1, max_context - len(prompt_ids))
        max_new = min(sampling.max_tokens, room)
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
        assert self._scheduler is not None
        deliveries = self._scheduler.deliveries

        def emit(item: Outgoing) -> None:
            # Held until the end of the inference thread's step: one wake-up per step, not per token.
            # A closed loop means nobody listens any more: the sequence is dropped at the next step.
            deliveries.post(loop, outbox.put_nowait, item, seq.cancel)

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
            thinking=self._thinking(request, room),
            max_total_tokens=room,
            grammar=grammar,
            logprobs=sampling.logprobs,
            rope_delta=vision.row.rope_delta if vision is not None else 0,
            vision=vision.row if vision is not None else None,
        )
        return seq, outbox


def _resolve(future: asyncio.Future[Usage], usage: Usage) -> None:
    if not future.done():
        future.set_result(usage)


class _Decoder:
    """Decoding runs on the consumer's event loop with the loaded tokenizer; the lock only guards
    against two event loops sharing one engine (prompt rendering has its own tokenizer)."""

    def __init__(self, tokenizer: Any, lock: threading.Lock) -> None:
        self._tokenizer = tokenizer
        self._lock = lock

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        with self._lock:
            return str(self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))


def _think_close_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids of ``</think>``, ids of the forced close ``"\\n</think>\\n\\n"``). The close is built from
    the pieces' own tokenizations, so the end ids always occur in it, also in a vocabulary where
    ``</think>`` is plain text (several tokens that would merge with the newlines around them)."""

    def ids(text: str) -> list[int]:
        return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]

    end = ids(THINK_END)
    return end, [*ids("\n"), *end, *ids("\n\n")]


def _vocab_size(model: Any) -> int:
    """Rows of the output layer: the logits' width (the tokenizer may count fewer tokens)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    width = getattr(head, "out_features", None)
    if isinstance(width, int):
        return width
    config = getattr(model.config, "text_config", None) or model.config
    return int(config.vocab_size)


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
