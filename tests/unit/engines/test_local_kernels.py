"""The sampler's compiled loops (engines/local/kernels.py) against the torch and Python steps they
replaced: the same bits for the penalty and the draw, the definition's order for the search."""

from __future__ import annotations

import bisect
import itertools

import numpy as np
import pytest
import torch

from qwen_gateway.engines.local import kernels

NO_FACTORS = np.zeros(0, np.float32)


def _logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_a_penalty_that_rounds_to_zero_gives_infinities_as_torch_does() -> None:
    flat = torch.tensor([2.0, -2.0, 0.0, 5.0])
    index = torch.tensor([0, 1, 2])
    want = flat.clone()
    vals = want.index_select(0, index)
    want.index_copy_(0, index, torch.where(vals < 0, vals * 1e-46, vals / 1e-46))
    got = flat.clone()
    kernels.repetition_penalty(got.numpy(), index.numpy(), NO_FACTORS, 1e-46)  # float32: 0.0
    assert got.tolist()[:2] == [float("inf"), -0.0] and torch.isnan(got[2]) and got[3] == 5.0
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[:2], want[:2])


def test_a_function_numba_cannot_cache_is_compiled_without_a_cache() -> None:
    """No writable cache location (a read-only install and home): compiled per process instead of
    failing at import. A function with no source file has no cache location either."""
    namespace: dict[str, object] = {}
    exec("def twice(x):\n    return 2 * x\n", namespace)
    compiled = kernels._compiled(namespace["twice"])  # type: ignore[arg-type]
    assert compiled(21) == 42


@pytest.mark.parametrize("factor", [1.05, 1.3, 0.8])
def test_the_repetition_penalty_has_torchs_bits(factor: float) -> None:
    flat = _logits(1, 8000, 1).view(-1)
    flat[:3] = torch.tensor([0.0, float("-inf"), -0.0])
    index = torch.cat(
        [torch.arange(3), torch.randperm(8000, generator=torch.Generator().manual_seed(2))[:700]]
    )
    index = index.unique()
    want = flat.clone()
    vals = want.index_select(0, index)
    want.index_copy_(0, index, torch.where(vals < 0, vals * factor, vals / factor))
    got = flat.clone()
    kernels.repetition_penalty(got.numpy(), index.numpy(), NO_FACTORS, factor)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit for bit, signed zeros too
    # One factor per entry (rows with different penalties).
    factors = torch.rand(index.numel(), generator=torch.Generator().manual_seed(3)) + 0.5
    want = flat.clone()
    want.index_copy_(0, index, torch.where(vals < 0, vals * factors, vals / factors))
    got = flat.clone()
    kernels.repetition_penalty(got.numpy(), index.numpy(), factors.numpy(), 0.0)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    untouched = torch.ones(8000, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(got[untouched], flat[untouched])


def _search(x: torch.Tensor, k: int, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's answer through the maxima of blocks of ``block`` ids (0: no blocks)."""
    count = x.shape[1] // block if block else 0
    maxima = x[:, : count * block].reshape(x.shape[0], count, block).amax(-1) if count else x[:, :0]
    values = torch.empty(x.shape[0], k)
    ids = torch.empty(x.shape[0], k, dtype=torch.long)
    kernels.top_k_from_maxima(x.numpy(), maxima.numpy(), block, values.numpy(), ids.numpy())
    return values, ids


@pytest.mark.parametrize("vocab", [151_936, 151_900, 49_152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_search_finds_the_k_best_with_ties_to_the_lower_id(vocab: int, dtype: torch.dtype) -> None:
    x = _logits(6, vocab, vocab).to(dtype).float()  # bfloat16 values: many exact ties
    x[1, :-5] = float("-inf")  # only the ragged tail's ids (or the last few) are left
    x[2, 1000:] = float("-inf")  # a mask that leaves the first thousand ids
    x[3, [7, 300, vocab - 3]] = x[3].max() + 1  # a three-way tie for the maximum, one in the tail
    x[4, 70_000 % vocab] = 50.0  # one dominant id
    # The definition: a stable sort puts equal values in the order of their ids.
    want_values, want_ids = torch.sort(x, dim=-1, descending=True, stable=True)
    for k, block in ((1, 128), (2, 128), (5, 128), (20, 128), (32, 128), (33, 32), (64, 32), (256, 32)):
        for blocks in (True, False):  # through the best blocks, or reading every id
            values, ids = _search(x, k, block if blocks else 0)
            assert torch.equal(values, want_values[:, :k]), (k, blocks)
            assert torch.equal(ids, want_ids[:, :k]), (k, blocks)
    assert _search(x, 1)[1][3].item() == 7


def test_a_nan_ranks_below_every_number_even_where_it_hides_a_blocks_maximum() -> None:
    x = _logits(3, 4096, 5)
    x[0, 130] = float("nan")
    x[0, 131] = 40.0  # in the NaN's block: amax gives NaN for it
    x[1, ::2] = float("nan")  # every block's maximum is NaN
    x[2] = float("nan")
    x[2, 4000] = 1.0
    values, ids = _search(x, 4)
    assert ids[0, 0] == 131 and ids[1, 0] == int(x[1, 1::2].argmax()) * 2 + 1
    assert ids[2, 0] == 4000 and values[2, 1:].tolist() == [float("-inf")] * 3
    assert ids[2, 1:].tolist() == [0, 1, 2]  # the NaNs, as -inf, lowest ids first
    assert not torch.isnan(values).any()


def test_a_row_with_fewer_finite_entries_than_k_still_fills_k() -> None:
    x = torch.full((1, 4096), float("-inf"))
    x[0, [9, 4000]] = torch.tensor([1.0, 2.0])
    values, ids = _search(x, 5)
    assert ids[0, :2].tolist() == [4000, 9] and values[0, :2].tolist() == [2.0, 1.0]
    assert torch.isinf(values[0, 2:]).all() and len(set(ids[0].tolist())) == 5


def _draw_before(probs: torch.Tensor, cut: torch.Tensor, numbers: list[float]) -> list[int]:
    """BatchSampler's cut and draw before kernels.nucleus_draw: torch's cumsum and masked_fill,
    then the draw in Python over the rows as floats."""
    cumulative = torch.cumsum(probs, dim=-1)
    kept = probs.masked_fill(cumulative - probs > cut, 0.0)
    last = probs.shape[-1] - 1
    return [
        min(bisect.bisect_right(cdf, u * cdf[-1]), last)
        for u, cdf in zip(numbers, (list(itertools.accumulate(r)) for r in kept.tolist()), strict=True)
    ]


@pytest.mark.parametrize("width", [5, 20, 256])
def test_the_nucleus_draw_picks_what_the_torch_steps_picked(width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    picked: set[int] = set()
    for trial in range(300):
        scale = [0.3, 3.0, 12.0][trial % 3]  # flat, usual and peaked distributions
        values = torch.sort(torch.randn(8, width, generator=gen) * scale, descending=True).values
        probs = torch.softmax(values / 0.7, dim=-1)
        cut = torch.rand(8, 1, generator=gen)
        numbers = torch.rand(8, generator=gen, dtype=torch.float64).tolist()
        picks = np.empty(8, np.int64)
        kernels.nucleus_draw(probs.numpy(), cut.view(-1).numpy(), np.asarray(numbers), picks)
        assert picks.tolist() == _draw_before(probs, cut, numbers)
        picked.update(picks.tolist())
    assert len(picked) >= 5  # the draws are not all the best candidate


def test_a_cut_of_zero_keeps_only_the_best_candidate() -> None:
    probs = torch.softmax(torch.tensor([[3.0, 2.9, 2.8, 0.0]]), dim=-1)
    picks = np.empty(1, np.int64)
    for u in (0.0, 0.5, 0.999999):
        kernels.nucleus_draw(probs.numpy(), np.zeros(1, np.float32), np.array([u]), picks)
        assert picks[0] == 0
