"""One request on the llama.cpp engine: its prompt, its sampler chain, the ids it generated, and the
rules that end it. Created by the engine on the event loop, then owned by the inference thread.

Sampling follows the rules the local engine follows too (engines/rules.py: settings, which ids the
penalties cover, the thinking budget), so a request means the same on both engines; then temperature,
top-k, top-p and a draw from the request's own seeded generator. The penalties are applied in place to
the row's logits, sparsely (only ids seen); llama.cpp's sampler chain does the rest in C.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Collection
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as C
import numpy as np

from qwen_gateway.engines.base import FinishReason
from qwen_gateway.engines.local.detok import StopTokenSequences
from qwen_gateway.engines.rules import PenaltyBook, ResolvedSampling, ThinkingBudget

_SEED_MODULUS = 0xFFFFFFFF  # llama.cpp's seed is 32-bit, and 0xFFFFFFFF itself means "random"


@dataclass(frozen=True, slots=True)
class Tokens:
    """Ids released to the consumer, with the counts after them; ``finish`` on the last one."""

    ids: tuple[int, ...]
    completion_tokens: int
    reasoning_tokens: int = 0
    finish: FinishReason | None = None


Outgoing = Tokens | BaseException
Emit = Callable[[Outgoing], None]


def sampler_chain(s: ResolvedSampling) -> Any:
    """llama.cpp's sampler chain for ``s``, a sampled (not greedy) request: greedy rows take the row's
    argmax in numpy instead (see Scheduler._choose). The caller frees it with ``llama_sampler_free``."""
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(s.temperature))
    if s.top_k > 0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1.0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(s.top_p, 1))
    seed = s.seed % _SEED_MODULUS if s.seed is not None else secrets.randbelow(_SEED_MODULUS)
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed))
    return chain


class Penalties:
    """The repetition / presence / frequency penalties of one sequence, applied to a logits row; which
    ids they cover is the shared rule's (:class:`~qwen_gateway.engines.rules.PenaltyBook`)."""

    def __init__(self, s: ResolvedSampling, prompt_ids: SequenceABC[int], exempt: Collection[int]) -> None:
        self._rep = s.repetition_penalty
        self._presence = s.presence_penalty
        self._frequency = s.frequency_penalty
        self._book = PenaltyBook(s, prompt_ids, exempt)
        self._seen_array: np.ndarray[Any, np.dtype[np.int64]] | None = None
        self._seen_size = -1
        self.active = s.penalized

    def observe(self, token: int) -> None:
        self._book.observe(token)

    def apply(self, logits: np.ndarray[Any, np.dtype[np.float32]]) -> None:
        seen, counts = self._book.seen, self._book.counts
        if seen is not None and seen.size:
            if self._seen_array is None or self._seen_size != seen.size:  # new ids since the last step
                self._seen_array = np.fromiter(seen.order, dtype=np.int64, count=seen.size)
                self._seen_size = seen.size
            ids = self._seen_array
            row = logits[ids]
            logits[ids] = np.where(row > 0, row / self._rep, row * self._rep)
        if counts:
            ids = np.fromiter(counts, dtype=np.int64, count=len(counts))
            occurrences = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            logits[ids] -= self._frequency * occurrences + self._presence


class Sequence:
    def __init__(
        self,
        *,
        request_id: str,
        prompt_ids: list[int],
        max_new_tokens: int,
        max_total_tokens: int,
        sampling: ResolvedSampling,
        eos_ids: frozenset[int],
        stop_token_ids: SequenceABC[SequenceABC[int]],
        emit: Emit,
        thinking: ThinkingBudget | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.max_total_tokens = max_total_tokens
        self.sampling = sampling
        self.eos_ids = eos_ids
        self.thinking = thinking
        self.penalties = Penalties(sampling, prompt_ids, eos_ids)
        self.generated: list[int] = []
        self.finished = False
        # Set by the consumer (event-loop thread), read by the inference thread; a bool store is atomic.
        self.cancelled = False
        # Set by the inference thread once it will never touch this sequence again (released, dropped
        # from the queue, or failed): from then on ``generated`` is final (a cancel's exact count).
        self.retired = threading.Event()
        # The inference thread's bookkeeping: the KV sequence id, tokens already in the KV cache, the
        # last chosen token (fed in the next decode), the sampler chain.
        self.seq_id = -1
        self.fed = 0
        self.pending: int | None = None
        self.chain: Any = None
        self._stop_tokens = StopTokenSequences(stop_token_ids)
        self._emit = emit

    @property
    def reservation(self) -> int:
        """KV cells this sequence may come to hold: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.max_total_tokens

    @property
    def reasoning_tokens(self) -> int:
        return 0 if self.thinking is None else self.thinking.reasoning_tokens(len(self.generated))

    def cancel(self) -> None:
        self.cancelled = True

    def accept(self, token: int) -> None:
        """Append a chosen token, release the ids it completes, and finish when a rule says so."""
        self.generated.append(token)
        self.penalties.observe(token)
        if self.thinking is not None:
            self.thinking.observe(self.generated)
        if token in self.eos_ids:
            self._finish("stop", self._stop_tokens.flush())
            return
        released = self._stop_tokens.push(token)
        if self._stop_tokens.stopped:
            self._finish("stop", released)
        elif self._at_length_limit():
            self._finish("length", released + self._stop_tokens.flush())
        else:
            self.pending = token
            if released:
                self._send(Tokens(tuple(released), len(self.generated), self.reasoning_tokens))

    def _at_length_limit(self) -> bool:
        n = len(self.generated)
        if n >= self.max_total_tokens:
            return True
        if self.thinking is None:
            return n >= self.max_new_tokens
        start = self.thinking.answer_start
        return start is not None and n - start >= self.max_new_tokens

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self._send(error)

    def _finish(self, reason: FinishReason, ids: list[int]) -> None:
        self.finished = True
        self.pending = None
        self._send(Tokens(tuple(ids), len(self.generated), self.reasoning_tokens, reason))

    def _send(self, item: Outgoing) -> None:
        try:
            self._emit(item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            self.cancelled = True
