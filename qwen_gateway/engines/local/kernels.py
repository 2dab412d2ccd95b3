"""The batched sampler's loops, compiled with numba: the repetition penalty, the top-k candidate
search and the nucleus cut with its draw.

Why compiled loops: after the output layer's product has streamed its weight (19 MB on the tiny
checkpoints) through the caches, each small torch operation costs 10-15 us more than in a warm loop,
and the sampler was some twenty of them per step (benchmarks/bench_sampler_parts.py). Each function
here does in one call, in one pass over the few entries it needs, what took several of them. The
bulk pass over the whole ``[rows, vocab]`` logits (the block maxima) stays with torch's vectorized
``amax``: numba's loops for it, plain or unrolled, measured 2-4x slower.

Every function works on numpy views of CPU tensors (no copies) and returns the bits the torch code
it replaces returned, except where a docstring says otherwise: the candidate search puts equal
values lowest id first, at every width (torch's ``topk`` left their order to its selection
algorithm, so a seeded row's tokens could depend on its neighbours' widths), and never prefers a
NaN to a number. Compiled on first use and cached on disk (:func:`_compiled`; measured: 3.3 s to
compile, 0.3 s to load from the cache, plus 0.2-0.4 s to import numba); :func:`warm` does that at
engine load so no request waits for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np

_F = TypeVar("_F", bound=Callable[..., Any])


def _compiled(fn: _F) -> _F:
    """``fn`` compiled by numba, its machine code cached on disk where numba finds a writable place
    (beside this file, else its user-wide cache); with none (a read-only install and home), compiled
    in every process instead of failing at import.

    ``error_model="numpy"``: a float division by zero gives inf, as torch's did, instead of raising
    half way through an in-place pass. The GIL stays held: each call is tens of microseconds, and a
    thread that lets it go must win it back from the event loop's thread afterwards (up to the 5 ms
    switch interval when that thread is busy)."""
    try:
        return cast(_F, numba.njit(cache=True, error_model="numpy")(fn))
    except RuntimeError:  # "cannot cache function ...: no locator available for file ..."
        return cast(_F, numba.njit(cache=False, error_model="numpy")(fn))


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
def _sift_down(heap_v: Any, heap_i: Any, n: int, at: int) -> None:
    """Restore the heap of ``n`` entries below ``at``: its root is the worst kept entry, "worse"
    meaning the lower value, or the same value and the higher id."""
    while True:
        child = 2 * at + 1
        if child >= n:
            return
        right = child + 1
        # (comparisons written out: a helper taking the arrays costs a reference count per call)
        if right < n and (
            heap_v[right] < heap_v[child]
            or (heap_v[right] == heap_v[child] and heap_i[right] > heap_i[child])
        ):
            child = right
        if heap_v[child] < heap_v[at] or (heap_v[child] == heap_v[at] and heap_i[child] > heap_i[at]):
            heap_v[at], heap_v[child] = heap_v[child], heap_v[at]
            heap_i[at], heap_i[child] = heap_i[child], heap_i[at]
            at = child
        else:
            return


@_compiled
def _offer(keep_v: Any, keep_i: Any, n: int, v: Any, i: int, listed: bool) -> int:
    """Keep entry (``v``, id ``i``) among the best ``len(keep_v)`` seen so far, of which there are
    ``n``; returns the new count. Callers offer ids in increasing order and only entries that beat
    the worst kept one once all places are taken, so an equal value never displaces a kept one (the
    lower id stays).

    ``listed``: the kept entries are a list in descending order, each new one inserted in place (for
    a few dozen places, cheaper than a heap's bookkeeping); else a heap whose root is the worst (for
    the nucleus' 256, where insertion would move ~128 entries each time)."""
    k = keep_v.shape[0]
    if listed:
        j = n if n < k else k - 1
        while j > 0 and v > keep_v[j - 1]:
            keep_v[j] = keep_v[j - 1]
            keep_i[j] = keep_i[j - 1]
            j -= 1
        keep_v[j] = v
        keep_i[j] = i
        return n + 1 if n < k else n
    if n < k:
        at = n
        keep_v[at] = v
        keep_i[at] = i
        while at > 0:  # sift up
            parent = (at - 1) // 2
            if keep_v[at] < keep_v[parent] or (keep_v[at] == keep_v[parent] and keep_i[at] > keep_i[parent]):
                keep_v[at], keep_v[parent] = keep_v[parent], keep_v[at]
                keep_i[at], keep_i[parent] = keep_i[parent], keep_i[at]
                at = parent
            else:
                break
        return n + 1
    keep_v[0] = v
    keep_i[0] = i
    _sift_down(keep_v, keep_i, k, 0)
    return n


@_compiled
def _read_whole(maxima: Any, r: int, k: int) -> bool:
    """Whether row ``r`` must be read whole: fewer than k blocks, or a NaN among its maxima (which
    hides that block's real maximum)."""
    count = maxima.shape[1]
    if count < k:
        return True
    for b in range(count):  # noqa: SIM110 (a plain loop compiles; numba takes no generator in any())
        if maxima[r, b] != maxima[r, b]:
            return True
    return False


@_compiled
def _span(chosen: int, block: int, count: int, vocab: int) -> tuple[int, int]:
    """The ids a search reads for block number ``chosen``, or for -1 the ragged tail past the blocks."""
    if chosen < 0:
        return count * block, vocab
    return chosen * block, chosen * block + block


@_compiled
def top_k_from_maxima(x: Any, maxima: Any, block: int, values: Any, ids: Any) -> None:
    """The ``k = values.shape[1]`` largest entries of each row of ``x`` ([rows, vocab] float32) into
    ``values`` (descending) and ``ids``, by :func:`_top_k_listed` up to ``LISTED_WIDTH`` places, else
    by :func:`_top_k` (a heap); both break ties and treat NaN the same way."""
    if values.shape[1] <= LISTED_WIDTH:
        _top_k_listed(x, maxima, block, values, ids)
    else:
        _top_k(x, maxima, block, values, ids, False)


@_compiled
def _top_k_listed(x: Any, maxima: Any, block: int, values: Any, ids: Any) -> None:
    """:func:`_top_k` with the kept entries a sorted list, its loops written out: the sampler's
    usual width (top-k 20) runs at about half the cost of the generic loops."""
    rows, vocab = x.shape
    k = values.shape[1]
    count = maxima.shape[1]
    best_v = np.empty(k, np.float32)
    best_b = np.empty(k, np.int64)
    minus_inf = np.float32(-np.inf)
    for r in range(rows):
        whole = _read_whole(maxima, r, k)
        if whole:
            _top_k(x[r : r + 1], maxima[r : r + 1, :0], block, values[r : r + 1], ids[r : r + 1], True)
            continue
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
        chosen = np.sort(best_b)
        m = 0
        out_v = values[r]
        out_i = ids[r]
        for c in range(k + 1):
            start, stop = _span(chosen[c] if c < k else -1, block, count, vocab)
            for t in range(start, stop):
                v = x[r, t]
                if m == k:
                    if not v > out_v[k - 1]:  # (a NaN fails it too)
                        continue
                    j = k - 1
                else:
                    if v != v:
                        v = minus_inf
                    j = m
                    m += 1
                while j > 0 and v > out_v[j - 1]:
                    out_v[j] = out_v[j - 1]
                    out_i[j] = out_i[j - 1]
                    j -= 1
                out_v[j] = v
                out_i[j] = t


@_compiled
def _top_k(x: Any, maxima: Any, block: int, values: Any, ids: Any, listed: bool) -> None:
    """The ``k = values.shape[1]`` largest entries of each row of ``x`` ([rows, vocab] float32) into
    ``values`` (descending) and ``ids``; equal values go lowest id first, and a NaN counts as -inf
    (it is never preferred to a number).

    ``maxima`` ([rows, count], count = 0 for none): the maximum of each whole block of ``block`` ids.
    Exact: every entry ranked above the k-th best sits in a block whose (maximum, lower block first)
    ranks among the k best blocks, so only those blocks and the ragged tail past ``count * block``
    are read. A row with fewer than k blocks, or a NaN among its maxima (which hides the block's real
    maximum), is read whole. ``listed``: the kept entries are a sorted list, else a heap (see
    :func:`_offer`).
    """
    rows, vocab = x.shape
    k = values.shape[1]
    count = maxima.shape[1]
    keep_v = np.empty(k, np.float32)
    keep_i = np.empty(k, np.int64)
    chosen = np.empty(k, np.int64)
    minus_inf = np.float32(-np.inf)
    for r in range(rows):
        whole = _read_whole(maxima, r, k)
        # Each loop rejects, in line, what cannot displace the worst kept entry (nearly every one):
        # ``floor``, once all k places are taken.
        n = 0
        floor = minus_inf
        if not whole:
            for b in range(count):
                v = maxima[r, b]
                if n < k or v > floor:
                    n = _offer(keep_v, keep_i, n, v, b, listed)
                    if n == k:
                        floor = keep_v[k - 1] if listed else keep_v[0]
            chosen[:] = keep_i
            chosen.sort()  # their ids in increasing order, then the tail's
            n = 0
            floor = minus_inf
        for c in range(k + 1):
            if whole:
                start, stop = (0, vocab) if c == 0 else (0, 0)
            else:
                start, stop = _span(chosen[c] if c < k else -1, block, count, vocab)
            for t in range(start, stop):
                v = x[r, t]
                if n < k or v > floor:  # (a NaN fails the comparison: only a filling list sees one)
                    n = _offer(keep_v, keep_i, n, minus_inf if v != v else v, t, listed)
                    if n == k:
                        floor = keep_v[k - 1] if listed else keep_v[0]
        if listed:
            values[r, :] = keep_v
            ids[r, :] = keep_i
            continue
        # Best first: the heap's worst goes last, then the next worst before it, ...
        for j in range(n - 1, -1, -1):
            values[r, j] = keep_v[0]
            ids[r, j] = keep_i[0]
            keep_v[0] = keep_v[j]
            keep_i[0] = keep_i[j]
            _sift_down(keep_v, keep_i, j, 0)


# Up to this many places the best entries are kept as a sorted list, past it as a heap.
LISTED_WIDTH = 32


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
    values, ids = np.empty((1, 2), np.float32), np.empty((1, 2), np.int64)
    repetition_penalty(x.reshape(-1), np.zeros(1, np.int64), np.zeros(0, np.float32), 1.0)
    top_k_from_maxima(x, pair, 4, values, ids)
    top_k_from_maxima(x, np.empty((1, 0), np.float32), 1, values, ids)
    nucleus_draw(pair / 2, np.ones(1, np.float32), np.zeros(1), np.empty(1, np.int64))
