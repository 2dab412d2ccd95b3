"""One request's state inside the inference thread: its tokens, sampler, stop matchers and outbox.

The scheduler only runs forward passes; everything a request decides about its own tokens (which one
comes next, whether it has ended, what text it may release) happens here, so both scheduling
strategies share it and per-request hooks (logits processors, forced tokens) live in one place.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from typing import Any

import torch

from qwen_gateway.engines.base import Finished, FinishReason, GenerationEvent, TextDelta, Usage
from qwen_gateway.engines.local.detok import IncrementalDetokenizer, StopStrings, StopTokenSequences
from qwen_gateway.engines.local.sampling import Sampler

log = logging.getLogger(__name__)

# (generated ids so far, logits row over the vocabulary) -> logits row. The hook for constrained
# decoding and thinking budgets: a processor may mask tokens by setting their logits to -inf.
LogitsProcessor = Callable[[SequenceABC[int], torch.Tensor], torch.Tensor]

# What the inference thread hands the consumer: an event, or an exception for it to raise.
Outgoing = GenerationEvent | BaseException
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
        detokenizer: IncrementalDetokenizer,
        eos_ids: frozenset[int],
        stop: SequenceABC[str],
        stop_token_ids: SequenceABC[SequenceABC[int]],
        emit: Emit,
        logits_processors: SequenceABC[LogitsProcessor] = (),
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.eos_ids = eos_ids
        self.logits_processors = list(logits_processors)
        # Tokens to emit next without sampling (e.g. "</think>" when a thinking budget runs out).
        self.forced_tokens: collections.deque[int] = collections.deque()
        self.generated: list[int] = []
        self.finished = False
        # Set from the event loop thread when the consumer goes away; read by the inference thread.
        # A plain bool suffices: one writer, one reader, and the GIL makes the store atomic.
        self.cancelled = False
        # Backend-owned KV cache (a DynamicCache) while this sequence runs on its own, and while its
        # prompt is being prefilled chunk by chunk (``prefilled`` prompt tokens are in it so far).
        self.cache: Any = None
        self.prefilled = 0
        self._detok = detokenizer
        self._stop_strings = StopStrings(stop)
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

    def usage(self) -> Usage:
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.generated))

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's row of last-position logits."""
        if self.forced_tokens:
            return self.forced_tokens.popleft()
        for processor in self.logits_processors:
            logits = processor(self.generated, logits)
        return self.sampler.sample(logits)

    def accept(self, token_id: int) -> None:
        """Append a chosen token, release the text it completes, and finish when a rule says so."""
        if self.finished:
            return  # a finished row still in a batched step: its token is not part of the answer
        self.generated.append(token_id)
        self.sampler.observe(token_id)
        if token_id in self.eos_ids:
            self._finish("stop", self._flush())
            return
        text = ""
        for released in self._stop_tokens.push(token_id):
            text += self._detok.push(released)
        text = self._stop_strings.push(text)
        if self._stop_strings.stopped:
            self._finish("stop", text)
            return
        if self._stop_tokens.stopped:
            self._finish("stop", text + self._flush())
            return
        if len(self.generated) >= self.max_new_tokens:
            self._finish("length", text + self._flush())
            return
        if text:
            self._send(TextDelta(text, usage=self.usage()))

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

    def _flush(self) -> str:
        """All text still held back, at the end of the answer. Held stop-sequence ids are released
        (they never completed a stop sequence); held text could still hide a stop string."""
        text = ""
        for released in self._stop_tokens.flush():
            text += self._detok.push(released)
        text += self._detok.flush()
        text = self._stop_strings.push(text)
        if not self._stop_strings.stopped:
            text += self._stop_strings.flush()
        return text

    def _finish(self, reason: FinishReason, text: str) -> None:
        if self._stop_strings.stopped:
            reason = "stop"
        self.finished = True
        self.cache = None
        self.release()
        usage = self.usage()
        if text:
            self._send(TextDelta(text, usage=usage))
        self._send(Finished(reason, usage))

    def _send(self, item: Outgoing) -> None:
        try:
            self._emit(item)
        except RuntimeError:
            # The consumer's event loop is closed: nobody is listening any more.
            self.cancelled = True
