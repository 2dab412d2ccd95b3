"""Token choice for the whole batch at once: penalties, bitmask, temperature, top-k, top-p, draws.

One :class:`BatchSampler` call per step takes the ``[rows, vocab]`` logits and per-row settings (kept
in each request's :class:`Sampler`) and returns one token per row. Rows with the same candidate width
are processed as one tensor, so a row's arithmetic is the same whether it runs alone or beside
others of its kind: a seeded request (which owns a ``torch.Generator`` and draws exactly one number
per token from it) gives the same tokens alone and in a batch. Unseeded rows share the engine's
generator; nobody touches torch's global seed.

Penalties are applied sparsely, to the tokens a row has seen, instead of as vocabulary-wide passes.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qwen_gateway.engines.base import SamplingParams

MIN_SAMPLING_TEMPERATURE = 1e-5
# A packed constraint mask: (function that masks the listed rows of float32 logits in place, rows).
PackedMask = tuple[Callable[[torch.Tensor, list[int]], None], list[int]]


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
    """One request's sampling state: its settings, its generator when seeded, what it has seen."""

    def __init__(
        self, settings: ResolvedSampling, prompt_ids: Sequence[int], exempt: Collection[int] = ()
    ) -> None:
        self.settings = settings
        s = settings
        # Ids the repetition penalty never touches: the end-of-turn/EOS ids. Every chat prompt holds
        # them (each turn ends with one), so Hugging Face's rule would make ending the answer ever less
        # likely: measured on the embedded SmolLM2 at 1.3, every answer then ran to its cap.
        self._exempt = frozenset(exempt)
        self.generator: torch.Generator | None = None
        if s.seed is not None and not s.greedy:
            self.generator = torch.Generator().manual_seed(s.seed)
        # Repetition penalty (Hugging Face semantics): every distinct id of the prompt and the output.
        self._seen: _IdSet | None = (
            _IdSet([i for i in prompt_ids if i not in self._exempt]) if s.repetition_penalty != 1.0 else None
        )
        # Presence/frequency penalties (OpenAI semantics): occurrences in the output only.
        self._counts: _IdCounts | None = (
            _IdCounts() if s.presence_penalty != 0.0 or s.frequency_penalty != 0.0 else None
        )

    def observe(self, token_id: int) -> None:
        """Record a token that became part of the output."""
        if self._seen is not None and token_id not in self._exempt:
            self._seen.add(token_id)
        if self._counts is not None:
            self._counts.add(token_id)

    def sample(self, logits: torch.Tensor) -> int:
        """One token from a 1-D row of logits (a batch of one)."""
        return BatchSampler().sample([self], logits.unsqueeze(0))[0]

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """The row with this request's penalties applied (a copy)."""
        out = logits.float().clone().unsqueeze(0)
        _penalize(out, [self])
        return out[0]


class _IdSet:
    """Distinct token ids in insertion order, as a growing tensor (no rebuild per token)."""

    def __init__(self, ids: Sequence[int]) -> None:
        unique = list(dict.fromkeys(int(i) for i in ids))
        self._known = set(unique)
        self._buf = torch.tensor(unique + [0] * max(16, len(unique)), dtype=torch.long)
        self.size = len(unique)

    def add(self, token_id: int) -> None:
        if token_id in self._known:
            return
        self._known.add(token_id)
        if self.size == self._buf.numel():
            self._buf = torch.cat([self._buf, torch.zeros_like(self._buf)])
        self._buf[self.size] = token_id
        self.size += 1

    def ids(self) -> torch.Tensor:
        return self._buf[: self.size]


class _IdCounts:
    def __init__(self) -> None:
        self._pos: dict[int, int] = {}
        self._ids = torch.zeros(16, dtype=torch.long)
        self._counts = torch.zeros(16, dtype=torch.float32)

    def add(self, token_id: int) -> None:
        pos = self._pos.get(token_id)
        if pos is None:
            pos = self._pos[token_id] = len(self._pos)
            if pos == self._ids.numel():
                self._ids = torch.cat([self._ids, torch.zeros_like(self._ids)])
                self._counts = torch.cat([self._counts, torch.zeros_like(self._counts)])
            self._ids[pos] = token_id
        self._counts[pos] += 1.0

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self._pos)
        return self._ids[:n], self._counts[:n]


def _penalize(logits: torch.Tensor, rows: Sequence[Sampler]) -> None:
    """Apply every row's penalties to ``logits`` ([rows, vocab], float32) in place, touching only the
    entries of tokens each row has seen."""
    vocab = logits.shape[-1]
    r_idx, c_idx, factor = [], [], []
    for i, row in enumerate(rows):
        if row._seen is not None and row._seen.size:
            ids = row._seen.ids()
            r_idx.append(torch.full_like(ids, i))
            c_idx.append(ids)
            factor.append(torch.full(ids.shape, row.settings.repetition_penalty))
    if r_idx:
        r, c, f = torch.cat(r_idx), torch.cat(c_idx), torch.cat(factor)
        keep = c < vocab
        r, c, f = r[keep], c[keep], f[keep]
        vals = logits[r, c]
        logits[r, c] = torch.where(vals < 0, vals * f, vals / f)
    r_idx, c_idx, sub = [], [], []
    for i, row in enumerate(rows):
        if row._counts is not None:
            ids, counts = row._counts.view()
            if ids.numel():
                s = row.settings
                r_idx.append(torch.full_like(ids, i))
                c_idx.append(ids)
                sub.append(counts * s.frequency_penalty + s.presence_penalty)
    if r_idx:
        r, c, d = torch.cat(r_idx), torch.cat(c_idx), torch.cat(sub)
        keep = c < vocab
        logits[r[keep], c[keep]] -= d[keep]


class BatchSampler:
    """Chooses the next token of every row of a step in one pass over ``[rows, vocab]`` logits."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Shared by unseeded rows: their draws need not be reproducible, only independent.
        self._generator = generator or torch.Generator().manual_seed(secrets.randbits(63))

    def sample(
        self,
        rows: Sequence[Sampler],
        logits: torch.Tensor,
        allowed: torch.Tensor | None = None,
        *,
        owned: bool = False,
        packed: PackedMask | None = None,
    ) -> list[int]:
        """One token per row. ``allowed`` ([rows, vocab] bool) masks out tokens (the bitmask of
        forced tokens). ``packed``: the grammar constraints' bitmask (``(apply, rows)``: ``apply``
        writes -inf into the listed rows of float32 logits). ``owned``: the caller hands ``logits``
        over, so penalties and masks may be written into it instead of into a copy."""
        penalized = any(r._seen is not None or r._counts is not None for r in rows)
        source = logits
        logits = logits.float()
        writes = penalized or allowed is not None or packed is not None
        if writes and not owned and logits is source:
            logits = logits.clone()  # never write into the caller's tensor
        if not logits.is_contiguous():
            logits = logits.contiguous()
        if penalized:
            _penalize(logits, rows)
        if allowed is not None:
            logits.masked_fill_(~allowed, float("-inf"))
        if packed is not None:
            packed[0](logits, packed[1])
        chosen = [0] * len(rows)
        groups: dict[tuple[int, bool], list[int]] = {}
        greedy: list[int] = []
        vocab = logits.shape[-1]
        for i, row in enumerate(rows):
            s = row.settings
            if s.greedy:
                greedy.append(i)
            else:
                # Candidate width: top-k, else enough for the nucleus, else (0) the whole vocabulary.
                width = s.top_k if s.top_k > 0 else NUCLEUS_CANDIDATES if s.top_p < 1.0 else 0
                groups.setdefault((min(width, vocab), s.top_k > 0), []).append(i)
        if greedy:
            index = torch.tensor(greedy)
            picks = torch.argmax(logits.index_select(0, index), dim=-1).tolist()
            for i, token in zip(greedy, picks, strict=True):
                chosen[i] = int(token)
        for (width, top_k), members in groups.items():
            tokens = self._sample_group(rows, logits, members, width, top_k)
            for i, token in zip(members, tokens, strict=True):
                chosen[i] = token
        return chosen

    def _sample_group(
        self, rows: Sequence[Sampler], logits: torch.Tensor, members: list[int], width: int, top_k: bool
    ) -> list[int]:
        every = len(members) == logits.shape[0] and members == list(range(len(members)))
        x = logits if every else logits.index_select(0, torch.tensor(members))
        temps = torch.tensor([rows[i].settings.temperature for i in members], dtype=torch.float32).unsqueeze(
            1
        )
        top_p = [rows[i].settings.top_p for i in members]
        if width == 0:  # no top-k, no top-p: the whole vocabulary
            return self._draw([rows[i] for i in members], torch.softmax(x / temps, dim=-1)).tolist()
        thresholds = list(top_p)
        fallback: list[int] = []
        if top_k:
            # A positive temperature keeps the order: take the candidates first, then scale only them.
            values, indices = torch.topk(x, width)
            values = values / temps
        else:
            x = x / temps
            values, indices = torch.topk(x, width)
            # Nucleus candidates: the top ``width`` tokens' share of the mass decides the cut; a row
            # whose nucleus is wider than the candidates falls back to the exact full sort.
            mass = torch.exp(torch.logsumexp(values, -1) - torch.logsumexp(x, -1)).tolist()
            for j, (p, m) in enumerate(zip(top_p, mass, strict=True)):
                if m >= p:
                    thresholds[j] = p / m
                else:
                    fallback.append(j)
        probs = torch.softmax(values, dim=-1)
        cut = torch.tensor(thresholds, dtype=torch.float32).unsqueeze(1)
        cumulative = torch.cumsum(probs, dim=-1)
        # Drop a candidate when the more likely ones already cover top_p; the best one always stays.
        probs = probs.masked_fill(cumulative - probs > cut, 0.0)
        picked = indices.gather(1, self._draw([rows[i] for i in members], probs).unsqueeze(1)).squeeze(1)
        out = [int(t) for t in picked.tolist()]
        for j in fallback:  # only rows without top-k fall back, and for them ``x`` is scaled
            out[j] = self._full_nucleus(rows[members[j]], x[j], top_p[j])
        return out

    def _full_nucleus(self, row: Sampler, x: torch.Tensor, top_p: float) -> int:
        values, indices = torch.sort(x, descending=True)
        probs = torch.softmax(values, dim=-1)
        cumulative = torch.cumsum(probs, dim=-1)
        probs = probs.masked_fill(cumulative - probs > top_p, 0.0)
        return int(indices[self._draw([row], probs.unsqueeze(0))[0]].item())

    def _draw(self, rows: Sequence[Sampler], probs: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF draw of one index per row: one uniform number per row (torch.multinomial
        costs about a millisecond per call over a full vocabulary on CPU). A seeded row draws from
        its own generator, the others from the shared one."""
        cdf = torch.cumsum(probs.double(), dim=-1)
        u = torch.empty(len(rows), dtype=torch.float64)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if shared:
            u[shared] = torch.rand(len(shared), generator=self._generator, dtype=torch.float64)
        for i, r in enumerate(rows):
            if r.generator is not None:
                u[i] = torch.rand((), generator=r.generator, dtype=torch.float64)
        target = (u * cdf[:, -1]).unsqueeze(1)
        # right=True: index i with cdf[i-1] <= u < cdf[i]; a zero-probability token has an empty interval.
        index = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return index.clamp_(max=probs.shape[-1] - 1)


# Most next-token distributions put top_p of their mass on far fewer tokens than this.
NUCLEUS_CANDIDATES = 256
