"""One request on the llama.cpp engine: its prompt, its sampler chain, the ids it generated, and the
rules that end it. Created by the engine on the event loop, then owned by the inference thread.

Sampling follows the local engine's semantics (engines/local/sampling.py) so a request means the same
on both engines: the repetition penalty (Hugging Face's rule, end-of-turn ids exempt) covers the prompt
and the answer, presence/frequency penalties (OpenAI's rule) the answer only; then temperature, top-k,
top-p and a draw from the request's own seeded generator. The penalties are applied in place to the
row's logits, sparsely (only ids seen); llama.cpp's sampler chain does the rest in C.
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

from qwen_gateway.engines.base import FinishReason, SamplingParams
from qwen_gateway.engines.local.detok import StopTokenSequences

MIN_SAMPLING_TEMPERATURE = 1e-5
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


@dataclass(frozen=True, slots=True)
class Defaults:
    """The GGUF's own sampling defaults (``general.sampling.*``, written by llama.cpp's converter from
    the checkpoint's generation_config.json); None where the file has none."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling settings with every default filled in: the request's value (which the service already
    filled from the model's configured defaults), else the GGUF's, else neutral."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @classmethod
    def of(cls, params: SamplingParams, defaults: Defaults = Defaults()) -> Sampling:
        def pick(value: float | None, default: float | None, fallback: float) -> float:
            if value is not None:
                return float(value)
            return float(default) if default is not None else fallback

        top_k = params.top_k if params.top_k is not None else defaults.top_k
        return cls(
            temperature=pick(params.temperature, defaults.temperature, 1.0),
            top_p=pick(params.top_p, defaults.top_p, 1.0),
            top_k=max(int(top_k or 0), 0),
            repetition_penalty=pick(params.repetition_penalty, defaults.repetition_penalty, 1.0),
            presence_penalty=float(params.presence_penalty or 0.0),
            frequency_penalty=float(params.frequency_penalty or 0.0),
            seed=params.seed,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE or self.top_k == 1


def sampler_chain(s: Sampling) -> Any:
    """llama.cpp's sampler chain for ``s`` (the caller frees it with ``llama_sampler_free``)."""
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    if s.greedy:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
        return chain
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(s.temperature))
    if s.top_k > 0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1.0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(s.top_p, 1))
    seed = s.seed % _SEED_MODULUS if s.seed is not None else secrets.randbelow(_SEED_MODULUS)
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed))
    return chain


class Penalties:
    """The repetition / presence / frequency penalties of one sequence, applied to a logits row."""

    def __init__(self, s: Sampling, prompt_ids: SequenceABC[int], exempt: Collection[int]) -> None:
        self._rep = s.repetition_penalty
        self._presence = s.presence_penalty
        self._frequency = s.frequency_penalty
        self._exempt = frozenset(exempt)
        self._seen: dict[int, None] = {}  # insertion-ordered set of ids the repetition penalty covers
        if self._rep != 1.0:
            self._seen = dict.fromkeys(i for i in prompt_ids if i not in self._exempt)
        self._counts: dict[int, int] = {}
        self._seen_array: np.ndarray[Any, np.dtype[np.int64]] | None = None
        self.active = self._rep != 1.0 or self._presence != 0.0 or self._frequency != 0.0

    def observe(self, token: int) -> None:
        if self._rep != 1.0 and token not in self._exempt and token not in self._seen:
            self._seen[token] = None
            self._seen_array = None
        if self._presence != 0.0 or self._frequency != 0.0:
            self._counts[token] = self._counts.get(token, 0) + 1

    def apply(self, logits: np.ndarray[Any, np.dtype[np.float32]]) -> None:
        if self._rep != 1.0 and self._seen:
            if self._seen_array is None:
                self._seen_array = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
            ids = self._seen_array
            row = logits[ids]
            logits[ids] = np.where(row > 0, row / self._rep, row * self._rep)
        if self._counts:
            ids = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
            logits[ids] -= self._frequency * counts + self._presence


class ThinkingBudget:
    """A reasoning block bounded by ``budget`` tokens: once spent without the closing ``end_ids``, the
    next tokens are ``close_ids`` (``"\\n</think>\\n\\n"``), forced, and the model then answers. The
    same rule as the local engine's mask (engines/local/masks.py), as forced ids instead of a bitmask
    (that one is a torch tensor)."""

    def __init__(self, budget: int, end_ids: SequenceABC[int], close_ids: SequenceABC[int]) -> None:
        self.budget = budget
        self.end_ids = tuple(end_ids)
        self.close_ids = list(close_ids)
        self.answer_start: int | None = None
        self._reasoning: int | None = None
        self._forced_at: int | None = None

    def observe(self, generated: SequenceABC[int]) -> None:
        if self.answer_start is not None:
            return
        n = len(self.end_ids)
        if n and len(generated) >= n and tuple(generated[-n:]) == self.end_ids:
            self.answer_start = len(generated)
            self._reasoning = self._forced_at if self._forced_at is not None else len(generated) - n

    def reasoning_tokens(self, generated: int) -> int:
        return self._reasoning if self._reasoning is not None else generated

    def forced(self, generated: int) -> int | None:
        """The id the next token must be, or None when the model chooses."""
        if self._forced_at is not None:
            k = generated - self._forced_at
            return self.close_ids[k] if 0 <= k < len(self.close_ids) else None
        if self.answer_start is not None or generated < self.budget:
            return None
        self._forced_at = generated
        return self.close_ids[0]


class Sequence:
    def __init__(
        self,
        *,
        request_id: str,
        prompt_ids: list[int],
        max_new_tokens: int,
        max_total_tokens: int,
        sampling: Sampling,
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
