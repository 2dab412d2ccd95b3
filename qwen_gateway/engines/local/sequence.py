"""One request's state inside the inference thread: its tokens, sampler, masks, end rules, outbox.

The scheduler only runs forward passes; everything a request decides about its own tokens (whether
it has ended, which ids it may release) happens here with integer work only. Turning ids into text
and matching stop strings happen on the consumer's side (:mod:`qwen_gateway.engines.local.detok`),
off the inference thread's critical path.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qwen_gateway.engines.base import FinishReason
from qwen_gateway.engines.local.detok import StopTokenSequences
from qwen_gateway.engines.local.masks import ThinkingBudget, TokenMask
from qwen_gateway.engines.local.sampling import Sampler

if TYPE_CHECKING:
    from qwen_gateway.engines.local.constraints import GrammarState

log = logging.getLogger(__name__)


# (the sampled token's logprob, ((rival id, its logprob), ...)), as computed in the inference thread.
RawLogprob = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True, slots=True)
class Tokens:
    """Progress of one sequence: ids safe to turn into text (never EOS, never a stop sequence's own
    ids), the completion tokens generated so far, and why it ended when it did."""

    ids: tuple[int, ...]
    completion_tokens: int
    finish: FinishReason | None = None
    reasoning_tokens: int = 0
    # One entry per id of ``ids`` when the request asked for logprobs.
    logprobs: tuple[RawLogprob, ...] = ()


# What the inference thread hands the consumer: progress, or an exception for it to raise.
Outgoing = Tokens | BaseException
Emit = Callable[[Outgoing], None]


class Sequence:
    """A request being served. Created by the engine, then owned by the inference thread."""

    def __init__(
        self,
        *,
        request_id: str,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampler: Sampler,
        eos_ids: frozenset[int],
        stop_token_ids: SequenceABC[SequenceABC[int]],
        emit: Emit,
        masks: SequenceABC[TokenMask] = (),
        rope_delta: int = 0,
        thinking: ThinkingBudget | None = None,
        max_total_tokens: int | None = None,
        grammar: GrammarState | None = None,
        logprobs: int | None = None,
        vision: Any = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.eos_ids = eos_ids
        # Token masks (forced tokens, thinking budget, later constraints), applied as the batch bitmask.
        self.masks = list(masks)
        # While thinking is on, max_new_tokens caps the answer alone; the reasoning block is bounded by
        # its budget (a mask, in ``masks`` too) and everything by max_total_tokens (the context's room).
        self.thinking = thinking
        if thinking is not None and thinking not in self.masks:
            self.masks.append(thinking)
        self.max_total_tokens = max_total_tokens
        # An output constraint's matcher: fills this row of the step's packed bitmask.
        self.grammar = grammar
        # None: no logprobs; k: the sampled token's logprob and k rivals per token.
        self.logprobs = logprobs
        self._pending_logprobs: collections.deque[tuple[int, RawLogprob]] = collections.deque()
        # M-RoPE models (Qwen-VL): a row's text positions are offset by what its images took.
        self.rope_delta = rope_delta
        # A VL prompt's media and 3-D positions (engines.local.vision.VisionRow), None for text.
        self.vision = vision
        self.generated: list[int] = []
        self.finished = False
        # Set from the event loop thread when the consumer goes away; read by the inference thread.
        # A plain bool suffices: one writer, one reader, and the GIL makes the store atomic.
        self.cancelled = False
        # Backend-owned KV state: a kvcache.RowKV in the batched backend, a DynamicCache when the
        # sequence runs on its own. ``prefilled`` prompt tokens are in it so far.
        self.kv: Any = None
        self.cache: Any = None
        self.prefilled = 0
        self._stop_tokens = StopTokenSequences(stop_token_ids)
        self._emit = emit
        # Set by the scheduler: called once when the sequence stops counting as active, which is
        # before its final event goes out, so a consumer that has its answer never sees it counted.
        self.on_release: Callable[[], None] | None = None
        self._released = False
        # Set by the consumer after it stopped reading early: told once the thread is done with this
        # sequence (its generated count final). The lock orders that against the thread's release.
        self._on_stopped: Callable[[], None] | None = None
        self._stop_lock = threading.Lock()

    # -- the consumer side ---------------------------------------------------------------------------

    def cancel(self) -> None:
        self.cancelled = True

    # -- the inference thread ------------------------------------------------------------------------

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= len(self.prompt_ids)

    @property
    def last_token(self) -> int:
        return self.generated[-1] if self.generated else self.prompt_ids[-1]

    @property
    def length(self) -> int:
        """Tokens in this sequence's KV cache once its last token has been fed."""
        return len(self.prompt_ids) + len(self.generated)

    def accept(self, token_id: int, logprob: RawLogprob | None = None) -> None:
        """Append a chosen token, release the ids it completes, and finish when a rule says so."""
        if self.finished:
            return  # a finished row still in a batched step: its token is not part of the answer
        if self.grammar is not None and not self.grammar.accept(token_id):
            raise RuntimeError(f"the output constraint refused token {token_id}")
        self.generated.append(token_id)
        self.sampler.observe(token_id)
        if self.thinking is not None:
            self.thinking.observe(self.generated)
        if logprob is not None:
            self._pending_logprobs.append((token_id, logprob))
        if token_id in self.eos_ids:
            self._finish("stop", self._stop_tokens.flush())
            return
        released = self._stop_tokens.push(token_id)
        if self._stop_tokens.stopped:
            self._finish("stop", released)
        elif self._at_length_limit():
            self._finish("length", released + self._stop_tokens.flush())
        elif released:
            self._send(
                Tokens(
                    tuple(released),
                    len(self.generated),
                    reasoning_tokens=self.reasoning_tokens,
                    logprobs=self._logprobs_of(released),
                )
            )

    @property
    def reasoning_tokens(self) -> int:
        return 0 if self.thinking is None else self.thinking.reasoning_tokens(len(self.generated))

    def _at_length_limit(self) -> bool:
        n = len(self.generated)
        if self.max_total_tokens is not None and n >= self.max_total_tokens:
            return True
        if self.thinking is None:
            return n >= self.max_new_tokens
        start = self.thinking.answer_start
        return start is not None and n - start >= self.max_new_tokens

    def release(self) -> None:
        with self._stop_lock:
            if self._released:
                return
            self._released = True
            stopped, self._on_stopped = self._on_stopped, None
        # Dropped once called: each callback refers back to the scheduler or the engine, and a cycle
        # through a finished sequence would keep the model's weights alive until a full collection.
        released, self.on_release = self.on_release, None
        if released is not None:
            released()
        if stopped is not None:
            stopped()

    def when_stopped(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from whichever thread gets there) once no step will touch this sequence
        again: at once if the thread already released it, else when it does."""
        with self._stop_lock:
            if not self._released:
                self._on_stopped = callback
                return
        callback()

    def fail(self, error: BaseException) -> None:
        """End this sequence with an error its consumer will raise."""
        if not self.finished:
            self.finished = True
            self.cache = None
            self.release()
            self._send(error)

    def _finish(self, reason: FinishReason, ids: list[int]) -> None:
        self.finished = True
        self.cache = None
        self.release()
        self._send(
            Tokens(tuple(ids), len(self.generated), reason, self.reasoning_tokens, self._logprobs_of(ids))
        )

    def _logprobs_of(self, ids: SequenceABC[int]) -> tuple[RawLogprob, ...]:
        """The pending entries of released ``ids``; entries of ids never released (EOS, a stop
        sequence's own ids) are dropped on the way."""
        pending = self._pending_logprobs
        if not pending:
            return ()
        out: list[RawLogprob] = []
        for token_id in ids:
            while pending and pending[0][0] != token_id:
                pending.popleft()
            if pending:
                out.append(pending.popleft()[1])
        return tuple(out)

    def _send(self, item: Outgoing) -> None:
        try:
            self._emit(item)
        except RuntimeError:
            # The consumer's event loop is closed: nobody is listening any more.
            self.cancelled = True
