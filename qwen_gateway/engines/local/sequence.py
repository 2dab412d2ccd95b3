"""One request's state inside the inference thread: its tokens, sampler, masks, end rules, outbox.

The scheduler only runs forward passes; everything a request decides about its own tokens (whether
it has ended, which ids it may release) happens here with integer work only. Turning ids into text
and matching stop strings happen on the consumer's side (:mod:`qwen_gateway.engines.local.detok`),
off the inference thread's critical path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any

from qwen_gateway.engines.base import FinishReason
from qwen_gateway.engines.local.detok import StopTokenSequences
from qwen_gateway.engines.local.masks import TokenMask
from qwen_gateway.engines.local.sampling import Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Tokens:
    """Progress of one sequence: ids safe to turn into text (never EOS, never a stop sequence's own
    ids), the completion tokens generated so far, and why it ended when it did."""

    ids: tuple[int, ...]
    completion_tokens: int
    finish: FinishReason | None = None


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
        vision: Any = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.eos_ids = eos_ids
        # Token masks (forced tokens, thinking budget, later constraints), applied as the batch bitmask.
        self.masks = list(masks)
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

    def accept(self, token_id: int) -> None:
        """Append a chosen token, release the ids it completes, and finish when a rule says so."""
        if self.finished:
            return  # a finished row still in a batched step: its token is not part of the answer
        self.generated.append(token_id)
        self.sampler.observe(token_id)
        if token_id in self.eos_ids:
            self._finish("stop", self._stop_tokens.flush())
            return
        released = self._stop_tokens.push(token_id)
        if self._stop_tokens.stopped:
            self._finish("stop", released)
        elif len(self.generated) >= self.max_new_tokens:
            self._finish("length", released + self._stop_tokens.flush())
        elif released:
            self._send(Tokens(tuple(released), len(self.generated)))

    def release(self) -> None:
        if not self._released:
            self._released = True
            if self.on_release is not None:
                self.on_release()

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
        self._send(Tokens(tuple(ids), len(self.generated), reason))

    def _send(self, item: Outgoing) -> None:
        try:
            self._emit(item)
        except RuntimeError:
            # The consumer's event loop is closed: nobody is listening any more.
            self.cancelled = True
