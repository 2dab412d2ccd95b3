"""Generation rules both in-process engines apply the same way, kept free of torch and llama.cpp so
either engine can use them: how a request's sampling settings are filled in, which ids its penalties
cover, and when a thinking budget forces the end of a reasoning block.

The arithmetic on a row of logits stays with each engine (torch tensors in engines/local/sampling.py,
a numpy view of llama.cpp's logits in engines/llamacpp/sequence.py); what is decided here is the same
for both, so a request means the same on either engine.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any

from qwen_gateway.engines.base import SamplingParams

MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """The checkpoint's own sampling defaults (transformers' ``generation_config``, or a GGUF's
    ``general.sampling.*`` keys); ``None`` where it sets none."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_generation_config(cls, config: Any) -> GenerationDefaults:
        if config is None:
            return cls()

        def number(name: str) -> Any:
            value = getattr(config, name, None)
            return value if isinstance(value, int | float) and not isinstance(value, bool) else None

        top_k = number("top_k")
        return cls(
            temperature=number("temperature"),
            top_p=number("top_p"),
            top_k=int(top_k) if top_k is not None else None,
            repetition_penalty=number("repetition_penalty"),
        )


@dataclass(frozen=True, slots=True)
class ResolvedSampling:
    """Sampling settings with every default filled in: the request's value (which the service already
    filled from the model's configured defaults), else the checkpoint's, else neutral."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    repetition_penalty: float = 1.0  # 1.0 = disabled
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        # Below ~1e-5 the scaled float32 logits overflow and softmax turns to NaN: sampling at such a
        # temperature is greedy decoding anyway, so do exactly that.
        return self.temperature < MIN_SAMPLING_TEMPERATURE or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def resolve(cls, params: SamplingParams, defaults: GenerationDefaults) -> ResolvedSampling:
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


class SeenIds:
    """Distinct token ids in insertion order: ``order`` is a plain list, so a batch's penalty index can
    take the ids added since it last looked (``order[taken:]``) without rebuilding from all of them."""

    def __init__(self, ids: Iterable[int] = ()) -> None:
        self.order = list(dict.fromkeys(int(i) for i in ids))
        self._known = set(self.order)

    @property
    def size(self) -> int:
        return len(self.order)

    def __contains__(self, token_id: object) -> bool:
        return token_id in self._known

    def add(self, token_id: int) -> None:
        if token_id not in self._known:
            self._known.add(token_id)
            self.order.append(token_id)


class PenaltyBook:
    """What one request's penalties cover, updated with every token it generates.

    - The repetition penalty (Hugging Face's rule) covers every distinct id of the prompt and of the
      output, except ``exempt``: the end-of-turn/EOS ids. Every chat prompt holds them (each turn ends
      with one), so Hugging Face's rule would make ending the answer ever less likely: measured on the
      embedded SmolLM2 at 1.3, every answer then ran to its cap.
    - The presence and frequency penalties (OpenAI's rule) count occurrences in the output only.

    ``seen`` is None when the repetition penalty is off, ``counts`` (id -> occurrences, in order of
    first occurrence) when both presence and frequency are."""

    def __init__(
        self, settings: ResolvedSampling, prompt_ids: SequenceABC[int], exempt: Collection[int] = ()
    ) -> None:
        self.exempt = frozenset(exempt)
        self.seen: SeenIds | None = (
            SeenIds(i for i in prompt_ids if i not in self.exempt)
            if settings.repetition_penalty != 1.0
            else None
        )
        self.counts: dict[int, int] | None = (
            {} if settings.presence_penalty != 0.0 or settings.frequency_penalty != 0.0 else None
        )

    def observe(self, token_id: int) -> None:
        """Record a token that became part of the output."""
        if self.seen is not None and token_id not in self.exempt:
            self.seen.add(token_id)
        if self.counts is not None:
            self.counts[token_id] = self.counts.get(token_id, 0) + 1


class ThinkingBudget:
    """A reasoning block and its budget: once ``budget`` tokens were generated without the closing
    ``end_ids`` (``</think>``: one special token in Qwen3's vocabulary, several plain ones in a
    vocabulary without it), the next tokens are forced to ``close_ids`` (``"\\n</think>\\n\\n"``) and
    the model then answers freely.

    It also tells where the block ended (:attr:`answer_start`) and how many tokens it spent
    (:meth:`reasoning_tokens`): the sequence caps the answer alone with ``max_tokens``. The sequence
    calls :meth:`observe` after every accepted token and :meth:`forced` before choosing the next one
    (the local engine turns that id into its bitmask row, see engines/local/masks.py).
    """

    def __init__(self, budget: int, end_ids: SequenceABC[int], close_ids: SequenceABC[int]) -> None:
        self.budget = budget
        self.end_ids = tuple(end_ids)
        self.close_ids = list(close_ids)
        self.answer_start: int | None = None  # index of the first answer token, once closed
        self._reasoning: int | None = None
        self._forced_at: int | None = None

    def observe(self, generated: SequenceABC[int]) -> None:
        if self.answer_start is not None:
            return
        n = len(self.end_ids)
        if n and len(generated) >= n and tuple(generated[-n:]) == self.end_ids:
            self.answer_start = len(generated)
            # A forced close counts from where the forcing began: its newline is not reasoning.
            self._reasoning = self._forced_at if self._forced_at is not None else len(generated) - n

    def reasoning_tokens(self, generated: int) -> int:
        """Tokens spent reasoning once ``generated`` tokens exist."""
        return self._reasoning if self._reasoning is not None else generated

    def forced(self, generated: int) -> int | None:
        """The id the next token must be once ``generated`` tokens exist, or None: the model chooses."""
        if self._forced_at is not None:
            k = generated - self._forced_at
            return self.close_ids[k] if 0 <= k < len(self.close_ids) else None
        if self.answer_start is not None or generated < self.budget:
            return None
        self._forced_at = generated
        return self.close_ids[0] if self.close_ids else None
