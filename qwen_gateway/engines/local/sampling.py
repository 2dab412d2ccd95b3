"""Per-request token choice: penalties, temperature, top-k, top-p, and a private random generator.

Every request owns a ``torch.Generator``, so a seeded request draws the same numbers whatever else
runs beside it, and no request ever touches torch's global seed.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qwen_gateway.engines.base import SamplingParams

MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """The checkpoint's ``generation_config`` values; ``None`` where it sets none."""

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
    """Sampling settings with every default filled in."""

    temperature: float
    top_p: float
    top_k: int  # 0 = disabled
    repetition_penalty: float  # 1.0 = disabled
    presence_penalty: float
    frequency_penalty: float
    seed: int | None

    @property
    def greedy(self) -> bool:
        # Below ~1e-5 the scaled float32 logits overflow and softmax turns to NaN: sampling at such a
        # temperature is greedy decoding anyway, so do exactly that.
        return self.temperature < MIN_SAMPLING_TEMPERATURE or self.top_k == 1

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


class Sampler:
    """Chooses one token from one row of logits; remembers what it chose for the penalties."""

    def __init__(self, settings: ResolvedSampling, prompt_ids: Sequence[int]) -> None:
        self.settings = settings
        self._prompt_ids = prompt_ids
        self._generator: torch.Generator | None = None
        # Vocabulary-sized state, built on the first step when the logits' size and device are known.
        self._seen: torch.Tensor | None = None  # bool: in prompt or output (repetition penalty)
        self._counts: torch.Tensor | None = None  # float: occurrences in output (OpenAI penalties)
        self._ready = False
        self._early: list[int] = []  # tokens observed before the first sample (forced tokens)

    def _setup(self, logits: torch.Tensor) -> None:
        self._ready = True
        vocab, device = logits.shape[-1], logits.device
        s = self.settings
        if s.repetition_penalty != 1.0:
            self._seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = torch.tensor([i for i in self._prompt_ids if 0 <= i < vocab], dtype=torch.long)
            self._seen[ids.to(device)] = True
        if s.presence_penalty != 0.0 or s.frequency_penalty != 0.0:
            self._counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        if not s.greedy:
            self._generator = torch.Generator(device=device)
            seed = s.seed if s.seed is not None else secrets.randbits(63)
            self._generator.manual_seed(seed)
        for token_id in self._early:
            self.observe(token_id)
        self._early.clear()

    def observe(self, token_id: int) -> None:
        """Record a token that became part of the output (sampled or forced)."""
        if not self._ready:
            self._early.append(token_id)
            return
        if self._seen is not None and token_id < self._seen.shape[0]:
            self._seen[token_id] = True
        if self._counts is not None and token_id < self._counts.shape[0]:
            self._counts[token_id] += 1.0

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if self._seen is not None:
            # Hugging Face semantics: shrink the magnitude of every seen token's logit.
            penalized = torch.where(logits < 0, logits * s.repetition_penalty, logits / s.repetition_penalty)
            logits = torch.where(self._seen, penalized, logits)
        if self._counts is not None:
            # OpenAI semantics: subtract per occurrence (frequency) and once if present (presence).
            logits = (
                logits
                - self._counts * s.frequency_penalty
                - (self._counts > 0).to(logits.dtype) * s.presence_penalty
            )
        return logits

    def sample(self, logits: torch.Tensor) -> int:
        """One token id from a 1-D row of logits."""
        if not self._ready:
            self._setup(logits)
        logits = self.penalize(logits.float())
        s = self.settings
        if s.greedy:
            return int(torch.argmax(logits).item())
        logits = logits / s.temperature
        threshold = s.top_p
        if s.top_k > 0:
            # top-k first: the nucleus is then cut from k candidates instead of sorting the vocabulary.
            values, indices = torch.topk(logits, min(s.top_k, logits.shape[-1]))
        elif s.top_p < 1.0:
            values, indices, mass = _nucleus_candidates(logits, s.top_p)
            # Candidates' probabilities are renormalised below; the nucleus is defined on the whole
            # distribution, so the cut is scaled by the candidates' share of it.
            threshold = s.top_p / mass
        else:
            return self._draw(torch.softmax(logits, dim=-1))
        probs = torch.softmax(values, dim=-1)
        if s.top_p < 1.0:
            # Drop a candidate when the more likely ones already cover top_p; the best one always stays.
            cumulative = torch.cumsum(probs, dim=-1)
            probs = probs.masked_fill(cumulative - probs > threshold, 0.0)
        return int(indices[self._draw(probs)].item())

    def _draw(self, probs: torch.Tensor) -> int:
        """Inverse-CDF draw of one index: one uniform number per token, where torch.multinomial
        costs about a millisecond per call over a full vocabulary on CPU."""
        cdf = torch.cumsum(probs.double(), dim=-1)
        u = torch.rand((), generator=self._generator, dtype=torch.float64, device=probs.device) * cdf[-1]
        # right=True: index i with cdf[i-1] <= u < cdf[i]; a zero-probability token has an empty interval.
        index = torch.searchsorted(cdf, u.reshape(1), right=True)
        return min(int(index.item()), probs.shape[-1] - 1)


# Most next-token distributions put top_p of their mass on far fewer tokens than this.
NUCLEUS_CANDIDATES = 256


def _nucleus_candidates(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The most likely tokens, in order, enough to hold the top_p nucleus, and their share of the
    probability mass. A top-k of a few hundred replaces sorting the whole vocabulary (~150k entries
    for Qwen), which is most of a decode step's sampling time on CPU; when the candidates don't
    cover top_p, it falls back to the full sort, so the result is exact either way."""
    size = logits.shape[-1]
    if size > NUCLEUS_CANDIDATES:
        values, indices = torch.topk(logits, NUCLEUS_CANDIDATES)
        mass = float(torch.exp(torch.logsumexp(values, -1) - torch.logsumexp(logits, -1)))
        if mass >= top_p:
            return values, indices, mass
    values, indices = torch.sort(logits, descending=True)
    return values, indices, 1.0
