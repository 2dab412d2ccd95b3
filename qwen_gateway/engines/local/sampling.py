"""Token choice for the whole batch at once: penalties, bitmask, temperature, top-k, top-p, draws.

One :class:`BatchSampler` call per step takes the ``[rows, vocab]`` logits and per-row settings (kept
in each request's :class:`Sampler`) and returns one token per row. Rows with the same candidate width
are processed as one tensor, so a row's arithmetic is the same whether it runs alone or beside
others of its kind: a seeded request (which owns a ``torch.Generator`` and draws exactly one number
per token from it) gives the same tokens alone and in a batch. Unseeded rows share the engine's
generator; nobody touches torch's global seed.

Penalties are applied sparsely, to the tokens a row has seen, instead of as vocabulary-wide passes.
The k best tokens of a row are found through block maxima (:func:`top_candidates`), exactly, at a
fraction of a full ``torch.topk``'s cost; greedy rows take :func:`first_argmax` the same way. Only
the candidates are scaled by temperature and cut by top-p. What depends on the batch's settings
alone (groups, parameter tensors, the penalty index) is kept until the batch changes. The loops over
a few entries each (the penalty, the search among the best blocks, the cut and the draw) are
compiled (kernels.py); the one pass over every logit stays with torch.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection, Sequence

import numpy as np
import torch

from qwen_gateway.engines.local import kernels

# The settings and the penalty bookkeeping are shared with the llama.cpp engine (re-exported here).
from qwen_gateway.engines.rules import MIN_SAMPLING_TEMPERATURE as MIN_SAMPLING_TEMPERATURE
from qwen_gateway.engines.rules import GenerationDefaults as GenerationDefaults
from qwen_gateway.engines.rules import PenaltyBook, SeenIds
from qwen_gateway.engines.rules import ResolvedSampling as ResolvedSampling

# A packed constraint mask: (function that masks the listed rows of float32 logits in place, rows).
PackedMask = tuple[Callable[[torch.Tensor, list[int]], None], list[int]]


class Sampler:
    """One request's sampling state: its settings, its generator when seeded, what it has seen."""

    def __init__(
        self, settings: ResolvedSampling, prompt_ids: Sequence[int], exempt: Collection[int] = ()
    ) -> None:
        self.settings = settings
        s = settings
        self.generator: torch.Generator | None = None
        if s.seed is not None and not s.greedy:
            self.generator = torch.Generator().manual_seed(s.seed)
        # Which ids the penalties cover (engines/rules.py, the same rule as the llama.cpp engine's).
        self._book = PenaltyBook(s, prompt_ids, exempt)
        self._seen: SeenIds | None = self._book.seen
        self._numbers: list[float] = []  # drawn ahead from ``generator``, used last-first
        self._counts: _IdCounts | None = (
            _IdCounts(self._book.counts) if self._book.counts is not None else None
        )

    def uniform(self) -> float:
        """The seeded generator's next float64 uniform number. Drawn ``SEED_DRAWS_AHEAD`` at a time:
        ``torch.rand(n)`` on CPU yields the numbers n scalar draws would, in order, so the request's
        tokens stay the same while a batch of 8 seeded rows makes one call every few dozen steps
        instead of eight per step."""
        if not self._numbers:
            assert self.generator is not None
            ahead = torch.rand(SEED_DRAWS_AHEAD, generator=self.generator, dtype=torch.float64)
            self._numbers = ahead.tolist()[::-1]
        return self._numbers.pop()

    def observe(self, token_id: int) -> None:
        """Record a token that became part of the output."""
        self._book.observe(token_id)

    def sample(self, logits: torch.Tensor) -> int:
        """One token from a 1-D row of logits (a batch of one)."""
        return BatchSampler().sample([self], logits.unsqueeze(0))[0]

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """The row with this request's penalties applied (a copy)."""
        out = logits.float().clone().unsqueeze(0)
        _Penalties([self], out.shape[-1]).apply(out)
        return out[0]


class _IdCounts:
    """A :class:`PenaltyBook`'s output counts as the two tensors the batch's penalty pass takes."""

    def __init__(self, counts: dict[int, int]) -> None:
        self._counts = counts

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor(list(self._counts), dtype=torch.long)
        return ids, torch.tensor(list(self._counts.values()), dtype=torch.float32)


class _Penalties:
    """A batch's penalties, applied to ``[rows, vocab]`` float32 logits in place, touching only the
    entries of tokens each row has seen.

    The repetition penalty's entries are kept as one flat index into the logits (and a factor per
    entry) that is extended by the ids rows saw since the last step, instead of being rebuilt from every
    row's ids at every step, and applied by one compiled pass (kernels.py). Index and factors are
    numpy buffers grown in place: a step then makes no tensor at all (``torch.tensor`` and
    ``torch.cat`` of a few new ids cost ~100 us together after the output layer's product, measured in
    the engine). Kept until the batch changes (:class:`_Plan`)."""

    def __init__(self, rows: Sequence[Sampler], vocab: int) -> None:
        self._vocab = vocab
        self._repeat = [
            (i, r._seen, r.settings.repetition_penalty) for i, r in enumerate(rows) if r._seen is not None
        ]
        self._taken = [0] * len(self._repeat)  # ids of each row's set already in the index
        self._index = _Buffer(np.int64)
        # One penalty for every row (the usual case: the checkpoint's default): a scalar factor, and
        # no factor per entry to keep (equal float32 factors divide bit for bit the same).
        penalties = {p for _, _, p in self._repeat}
        self._scalar: float | None = penalties.pop() if len(penalties) == 1 else None
        self._factor = _Buffer(np.float32)  # stays empty with a scalar factor
        self._counted = [(i, r) for i, r in enumerate(rows) if r._counts is not None]

    def apply(self, logits: torch.Tensor) -> None:
        flat = logits.view(-1)
        if self._repeat:
            self._take_new_ids()
            # One compiled pass over the entries: index_select, where and index_copy_ were four
            # operations, each slowed by the output layer's product having emptied the caches.
            scalar = self._scalar
            kernels.repetition_penalty(
                _np(flat), self._index.view(), self._factor.view(), 0.0 if scalar is None else float(scalar)
            )
        if self._counted:
            r_idx, c_idx, sub = [], [], []
            for i, row in self._counted:
                assert row._counts is not None
                ids, counts = row._counts.view()
                if ids.numel():
                    s = row.settings
                    r_idx.append(torch.full_like(ids, i))
                    c_idx.append(ids)
                    sub.append(counts * s.frequency_penalty + s.presence_penalty)
            if r_idx:
                r, c, d = torch.cat(r_idx), torch.cat(c_idx), torch.cat(sub)
                keep = c < self._vocab
                logits[r[keep], c[keep]] -= d[keep]

    def _take_new_ids(self) -> None:
        vocab = self._vocab
        index: list[int] = []
        factor: list[float] = []
        for j, (i, seen, penalty) in enumerate(self._repeat):
            size = seen.size
            if size > self._taken[j]:
                fresh = [i * vocab + t for t in seen.order[self._taken[j] : size] if t < vocab]
                index += fresh
                if self._scalar is None:
                    factor += [penalty] * len(fresh)
                self._taken[j] = size
        if index:  # (one numpy write per step: each costs a microsecond or two)
            self._index.extend(index)
            if self._scalar is None:
                self._factor.extend(factor)


class _Buffer:
    """A numpy array that grows at its end (capacity doubled when full); :meth:`view` is what it holds."""

    __slots__ = ("_data", "_size")

    def __init__(self, dtype: type[np.generic]) -> None:
        self._data = np.empty(256, dtype=dtype)
        self._size = 0

    def extend(self, values: list[int] | list[float]) -> None:
        end = self._size + len(values)
        if end > self._data.shape[0]:
            grown = np.empty(max(end, 2 * self._data.shape[0]), dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : end] = values
        self._size = end

    def view(self) -> np.ndarray:
        return self._data[: self._size]


class BatchSampler:
    """Chooses the next token of every row of a step in one pass over ``[rows, vocab]`` logits.

    What a step needs from the rows' settings (which rows are greedy, the groups of equal candidate
    width, their temperature and top-p tensors, who owns a generator) is worked out once per batch
    composition and reused until a row joins or leaves (:class:`_Plan`)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Shared by unseeded rows: their draws need not be reproducible, only independent.
        self._generator = generator or torch.Generator().manual_seed(secrets.randbits(63))
        self._plan: _Plan | None = None

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
        plan = self._plan_for(rows, logits.shape[-1])
        source = logits
        if logits.dtype != torch.float32:  # (a call less after the output layer's product)
            logits = logits.float()
        writes = plan.penalties is not None or allowed is not None or packed is not None
        if writes and not owned and logits is source:
            logits = logits.clone()  # never write into the caller's tensor
        if not logits.is_contiguous():
            logits = logits.contiguous()
        if plan.penalties is not None:
            plan.penalties.apply(logits)
        if allowed is not None:
            logits.masked_fill_(~allowed, float("-inf"))
        if packed is not None:
            packed[0](logits, packed[1])
        chosen = [0] * len(rows)
        if plan.greedy:
            picks = first_argmax(_rows_of(logits, plan.greedy_index)).tolist()
            for i, token in zip(plan.greedy, picks, strict=True):
                chosen[i] = int(token)
        if plan.selected:
            # One candidate search for every row that needs one, at the widest width asked: a row of
            # width k takes the first k of the sorted candidates, which are exactly its own top k.
            picked = _rows_of(logits, plan.selected_index)
            found = _search(picked, plan.width)
            for group in plan.groups:
                top = found.values
                if group.at is not None:
                    top = top.index_select(0, group.at)
                if group.width < plan.width:
                    top = top[:, : group.width]
                tokens = self._sample_candidates(group, picked, top, found)
                for row, token in zip(group.members, tokens, strict=True):
                    chosen[row] = token
        for group in plan.full:
            x = _rows_of(logits, group.index)
            probs = torch.softmax(x / group.temps, dim=-1)
            for row, token in zip(group.members, self._draw(group, probs), strict=True):
                chosen[row] = token
        return chosen

    def _plan_for(self, rows: Sequence[Sampler], vocab: int) -> _Plan:
        plan = self._plan
        if (
            plan is None
            or plan.vocab != vocab
            or len(plan.rows) != len(rows)
            or any(a is not b for a, b in zip(plan.rows, rows, strict=True))
        ):
            plan = self._plan = _Plan(rows, vocab)
        return plan

    def _sample_candidates(
        self, group: _Group, picked: torch.Tensor, values: torch.Tensor, found: _Found
    ) -> list[int]:
        """A group's tokens from its rows' sorted top candidates (``values``, unscaled; their ids
        in ``found``)."""
        values = values / group.temps  # a positive temperature keeps the order: scale only candidates
        cut = group.cut
        fallback: list[int] = []
        scaled: torch.Tensor | None = None
        if not group.top_k:
            # Nucleus candidates: the top ``width`` tokens' share of the mass decides the cut; a row
            # whose nucleus is wider than the candidates falls back to the exact full sort.
            x = picked if group.at is None else picked.index_select(0, group.at)
            scaled = x / group.temps
            mass = torch.exp(torch.logsumexp(values, -1) - torch.logsumexp(scaled, -1)).tolist()
            thresholds = list(group.top_p)
            for j, (p, m) in enumerate(zip(group.top_p, mass, strict=True)):
                if m >= p:
                    thresholds[j] = p / m
                else:
                    fallback.append(j)
            cut = torch.tensor(thresholds, dtype=torch.float32).unsqueeze(1)
        probs = torch.softmax(values, dim=-1)
        # The cut (a candidate goes when the more likely ones already cover top_p; the best one always
        # stays) and the draw in one compiled call: the same bits as torch's cumsum and masked_fill
        # and the Python draw they replace (kernels.nucleus_draw).
        picks = np.empty(len(group.rows), dtype=np.int64)
        kernels.nucleus_draw(_np(probs), _np(cut.view(-1)), np.asarray(self._numbers(group)), picks)
        out = found.ids(group.positions, picks.tolist())
        for j in fallback:  # only rows without top-k fall back, and for them ``scaled`` is set
            assert scaled is not None
            out[j] = self._full_nucleus(group.rows[j], scaled[j], group.top_p[j])
        return out

    def _full_nucleus(self, row: Sampler, x: torch.Tensor, top_p: float) -> int:
        values, indices = torch.sort(x, descending=True)
        probs = torch.softmax(values, dim=-1)
        cumulative = torch.cumsum(probs, dim=-1)
        probs = probs.masked_fill(cumulative - probs > top_p, 0.0)
        return int(indices[self._draw(_Group.single(row), probs.unsqueeze(0))[0]].item())

    def _numbers(self, group: _Group) -> list[float]:
        """One uniform number in [0, 1) per row of the group: a seeded row's from its own generator,
        the others' from the shared one."""
        numbers: list[float] = [0.0] * len(group.rows)
        if group.shared:
            shared = torch.rand(len(group.shared), generator=self._generator, dtype=torch.float64)
            for i, number in zip(group.shared, shared.tolist(), strict=True):
                numbers[i] = number
        for i, row in group.seeded:
            numbers[i] = row.uniform()
        return numbers

    def _draw(self, group: _Group, probs: torch.Tensor) -> list[int]:
        """Inverse-CDF draw of one index per row: one uniform number per row (torch.multinomial
        costs about a millisecond per call over a full vocabulary on CPU). Full-vocabulary rows only:
        candidates are drawn by kernels.nucleus_draw."""
        numbers = self._numbers(group)
        last = probs.shape[-1] - 1
        cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
        u = torch.tensor(numbers, dtype=torch.float64)
        target = (u * cdf[:, -1]).unsqueeze(1)
        # right=True: index i with cdf[i-1] <= u < cdf[i]; a zero-probability token has an empty interval.
        index = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return [int(i) for i in index.clamp_(max=last).tolist()]


class _Group:
    """Rows of a step that share a candidate width (and whether it is a top-k): one tensor each."""

    __slots__ = (
        "at",
        "cut",
        "index",
        "members",
        "positions",
        "rows",
        "seeded",
        "shared",
        "temps",
        "top_k",
        "top_p",
        "width",
    )

    def __init__(self, rows: Sequence[Sampler], members: list[int], width: int, top_k: bool) -> None:
        self.members = members  # positions in the batch
        self.rows = [rows[i] for i in members]
        self.width = width
        self.top_k = top_k
        self.index = _index(members, len(rows))  # None: every row of the batch, in order
        # Positions among the batch's candidate-searching rows; None when the group is all of them.
        self.at: torch.Tensor | None = None
        self.positions: list[int] = list(range(len(members)))  # ``at`` as a list
        self.temps = torch.tensor([r.settings.temperature for r in self.rows], dtype=torch.float32).unsqueeze(
            1
        )
        self.top_p = [r.settings.top_p for r in self.rows]
        self.cut = torch.tensor(self.top_p, dtype=torch.float32).unsqueeze(1)
        self.shared = [i for i, r in enumerate(self.rows) if r.generator is None]
        self.seeded = [(i, r) for i, r in enumerate(self.rows) if r.generator is not None]

    @classmethod
    def single(cls, row: Sampler) -> _Group:
        return cls([row], [0], 0, False)


class _Plan:
    """How one batch composition is sampled: greedy rows, groups of equal width, full-vocabulary rows."""

    def __init__(self, rows: Sequence[Sampler], vocab: int) -> None:
        self.rows = tuple(rows)
        self.vocab = vocab
        penalized = any(r._seen is not None or r._counts is not None for r in rows)
        self.penalties = _Penalties(rows, vocab) if penalized else None
        self.greedy: list[int] = []
        widths: dict[tuple[int, bool], list[int]] = {}
        for i, row in enumerate(rows):
            s = row.settings
            if s.greedy:
                self.greedy.append(i)
            else:
                # Candidate width: top-k, else enough for the nucleus, else (0) the whole vocabulary.
                width = s.top_k if s.top_k > 0 else NUCLEUS_CANDIDATES if s.top_p < 1.0 else 0
                widths.setdefault((min(width, vocab), s.top_k > 0), []).append(i)
        self.greedy_index = _index(self.greedy, len(rows))
        self.full = [_Group(rows, m, 0, False) for (w, _), m in widths.items() if w == 0]
        self.groups = [_Group(rows, m, w, k) for (w, k), m in widths.items() if w > 0]
        self.selected = sorted(i for g in self.groups for i in g.members)
        self.selected_index = _index(self.selected, len(rows))
        self.width = max((g.width for g in self.groups), default=0)
        position = {row: j for j, row in enumerate(self.selected)}
        for g in self.groups:
            if len(g.members) != len(self.selected):
                g.positions = [position[i] for i in g.members]
                g.at = torch.tensor(g.positions, dtype=torch.long)


def _index(members: list[int], rows: int) -> torch.Tensor | None:
    """An index tensor of ``members``, or None when they are every row in order (no copy needed)."""
    return None if members == list(range(rows)) else torch.tensor(members, dtype=torch.long)


def _rows_of(logits: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return logits if index is None else logits.index_select(0, index)


# -- the candidate search -------------------------------------------------------------------------
#
# torch.topk over a [8, 152k] row costs about as much as the tiny checkpoints' whole output layer
# (measured: 2.1 ms against 5.0 ms, one thread). A vectorized maximum per block of ids is ~15x
# cheaper than that selection, and the k best ids of a row can only lie in the k blocks with the
# highest maxima: every id better than the k-th best value sits in a block whose maximum is at least
# as high, and such blocks number at most k. So: block maxima, the top k blocks, then top-k among
# their ids only (and the vocabulary's ragged tail, when its size is not a multiple of the block).

SEARCH_BLOCK = 128  # ids per block for narrow searches (top-k of a few dozen, argmax)
WIDE_SEARCH_BLOCK = 32  # for wide ones (the nucleus' 256 candidates): fewer ids to read per block


def _split(x: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The block maxima of ``x`` ([rows, vocab]) for a search of width ``k``, and the block size; no
    blocks (``[rows, 0]``) when they would not save work over reading every id."""
    block = SEARCH_BLOCK if k <= 32 else WIDE_SEARCH_BLOCK
    vocab = x.shape[-1]
    count = vocab // block
    if count < 4 * k:
        return _NO_MAXIMA.expand(x.shape[0], 0), block
    whole = x if count * block == vocab else x[:, : count * block]  # (no slicing call without a tail)
    # The one pass over every logit, at memory speed (see kernels.py); the ragged tail is left out.
    return whole.view(x.shape[0], count, block).amax(-1), block


_NO_MAXIMA = torch.empty(1, 0, dtype=torch.float32)  # never written to


def top_candidates(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of ``x`` ([rows, vocab]) in descending order and their ids,
    as ``torch.topk`` gives them, except that equal values come lowest id first (at every width, so
    a row's candidates never depend on its neighbours), a NaN ranks below every number and the values
    are ranked as float32."""
    found = _search(x, k)
    return found.values.to(x.dtype), found.ids_tensor


class _Found:
    """The k best candidates of each row: ``values`` ([rows, k], descending) and their ids."""

    __slots__ = ("ids_tensor", "values")

    def __init__(self, values: torch.Tensor, ids: torch.Tensor) -> None:
        self.values = values
        self.ids_tensor = ids

    def ids(self, rows: list[int], picks: list[int]) -> list[int]:
        """The ids of candidate ``picks[j]`` of row ``rows[j]``, for each j."""
        ids = self.ids_tensor.numpy()  # (a [rows, k] tolist is 160 Python ints, of which 8 are wanted)
        return [int(ids[r, j]) for r, j in zip(rows, picks, strict=True)]


def _search(x: torch.Tensor, k: int) -> _Found:
    """The k best of each row by the compiled search over the best blocks (kernels.py), ranked as
    float32 (the sampler's logits). ``0 < k <= vocab``, as torch.topk requires: the kernel trusts it."""
    if not 0 < k <= x.shape[-1]:
        raise ValueError(f"a search for the {k} best of {x.shape[-1]} ids")
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    maxima, block = _split(x, k)
    values = torch.empty((x.shape[0], k), dtype=torch.float32)
    ids = torch.empty((x.shape[0], k), dtype=torch.long)
    kernels.top_k_from_maxima(_np(x), _np(maxima), block, values.numpy(), ids.numpy())
    return _Found(values, ids)


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of CPU tensor ``t`` (the engine samples in inference mode; a caller's tensor
    that requires grad is viewed through ``detach``)."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, -1)`` of ``x`` ([rows, vocab]), the first id of the maximum included (the
    search of one candidate), except that a NaN is never the maximum of a row that has a number and
    the values are compared as float32."""
    return _search(x, 1).ids_tensor.view(-1)


# Most next-token distributions put top_p of their mass on far fewer tokens than this.
NUCLEUS_CANDIDATES = 256
# Uniform numbers a seeded row draws from its generator at once (Sampler.uniform).
SEED_DRAWS_AHEAD = 32
