"""The batched sampler's loops, compiled with numba: the repetition penalty, the top-k candidate
search and the nucleus cut with its draw.

Why compiled loops: after the output layer's product has streamed its weight (19 MB on the tiny
checkpoints) through the caches, each small torch operation costs 10-15 us more than in a warm loop,
and the sampler was some twenty of them per step (benchmarks/bench_sampler_parts.py). Each function
here does in one call, in one pass over the few entries it needs, what took several of them. The
bulk pass over the whole ``[rows, vocab]`` logits (the block maxima) stays with torch's vectorized
``amax``: numba's loops for it, plain or unrolled, measured 2-4x slower.

Every function works on numpy views of CPU tensors (no copies) and returns the bits the torch code
it replaces returned, except where a docstring says otherwise: the candidate search breaks ties by
the lower id (torch's ``topk`` left their order to its selection algorithm). Compiled on first use
and cached on disk beside this file, or in numba's user-wide cache where that is read-only
(``cache=True``; measured: 3.3 s to compile, 0.3 s to load from the cache, plus 0.4 s to import
numba); :func:`warm` does that at engine load so no request waits for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np

_F = TypeVar("_F", bound=Callable[..., Any])

# The GIL stays held: each call is tens of microseconds, and a thread that lets it go must win it back
# from the event loop's thread afterwards (up to the 5 ms switch interval when that thread is busy).
_compiled = cast(Callable[[_F], _F], numba.njit(cache=True))


@_compiled
def repetition_penalty(flat: Any, index: Any, factors: Any, factor: float) -> None:
    """Hugging Face's repetition penalty on the entries ``index`` of ``flat`` (float32), in place: a
    negative logit is multiplied by its factor, another divided by it. ``factors`` (float32, one per
    entry) when rows differ, else empty and the scalar ``factor`` for every entry."""
    one = factors.shape[0] == 0
    f = np.float32(factor)
    for j in range(index.shape[0]):
        i = index[j]
        g = f if one else factors[j]
        v = flat[i]
        flat[i] = v * g if v < 0 else v / g


@_compiled
def top_k_from_maxima(x: Any, maxima: Any, block: int, values: Any, ids: Any) -> None:
    """The ``k = values.shape[1]`` largest entries of each row of ``x`` ([rows, vocab] float32) into
    ``values`` (descending) and ``ids``; ties go to the lower id.

    ``maxima`` ([rows, count]): the maximum of each whole block of ``block`` ids. Exact: every
    entry ranked above the k-th best sits in a block whose (maximum, lower block first) ranks among
    the k best blocks, so only those blocks, and the ragged tail past ``count * block``, are read.
    """
    rows, vocab = x.shape
    k = values.shape[1]
    count = maxima.shape[1]
    best_v = np.empty(k, np.float32)
    best_b = np.empty(k, np.int64)
    for r in range(rows):
        # The k best blocks, by insertion into a descending list (ties keep the lower block).
        n = 0
        for b in range(count):
            v = maxima[r, b]
            if n == k:
                if not v > best_v[k - 1]:
                    continue
                j = k - 1
            else:
                j = n
                n += 1
            while j > 0 and v > best_v[j - 1]:
                best_v[j] = best_v[j - 1]
                best_b[j] = best_b[j - 1]
                j -= 1
            best_v[j] = v
            best_b[j] = b
        # Their ids in increasing order, then the tail: an entry equal to one already held stays behind it.
        chosen = np.sort(best_b[:n])
        m = 0
        out_v = values[r]
        out_i = ids[r]
        for c in range(n + 1):
            if c < n:
                start = chosen[c] * block
                stop = start + block
            else:
                start = count * block
                stop = vocab
            for t in range(start, stop):
                v = x[r, t]
                if m == k:
                    if not v > out_v[k - 1]:
                        continue
                    j = k - 1
                else:
                    j = m
                    m += 1
                while j > 0 and v > out_v[j - 1]:
                    out_v[j] = out_v[j - 1]
                    out_i[j] = out_i[j - 1]
                    j -= 1
                out_v[j] = v
                out_i[j] = t


@_compiled
def nucleus_draw(probs: Any, cut: Any, numbers: Any, picks: Any) -> None:
    """One candidate per row of ``probs`` ([rows, k] float32, each row a softmax in descending
    order) into ``picks``: the candidates whose more likely ones already cover ``cut[r]`` are dropped
    (the best one always stays), then an inverse-CDF draw with ``numbers[r]`` (float64 in [0, 1)).

    The same bits as the torch and Python steps it replaces (BatchSampler's cut and draw): torch's
    CPU ``cumsum`` of float32 adds in float64 and rounds each running sum to float32; the drop test is
    a float32 subtraction and comparison; the draw adds the kept float32 values in float64, left to
    right, and takes the first index whose running sum exceeds ``number * total`` (bisect_right)."""
    rows, k = probs.shape
    for r in range(rows):
        limit = cut[r]
        running = 0.0
        sums = np.empty(k, np.float64)
        total = 0.0
        for j in range(k):
            p = probs[r, j]
            running += np.float64(p)
            cumulative = np.float32(running)
            kept = np.float32(0.0) if cumulative - p > limit else p
            total += np.float64(kept)
            sums[j] = total
        target = numbers[r] * total
        pick = k - 1
        for j in range(k):
            if sums[j] > target:
                pick = j
                break
        picks[r] = pick


def warm() -> None:
    """Compile (or load from the disk cache) every function for the types the sampler passes."""
    x = np.zeros((1, 8), np.float32)
    pair = np.ones((1, 2), np.float32)
    repetition_penalty(x.reshape(-1), np.zeros(1, np.int64), np.zeros(0, np.float32), 1.0)
    top_k_from_maxima(x, pair, 4, np.empty((1, 2), np.float32), np.empty((1, 2), np.int64))
    nucleus_draw(pair / 2, np.ones(1, np.float32), np.zeros(1), np.empty(1, np.int64))
