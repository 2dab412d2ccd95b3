"""The faster sampler against a copy of the one before it: the same tokens for seeded and greedy rows.

Random settings (temperatures, top-k, top-p with and without top-k, all three penalties, seeds),
batches of one to eight rows, Qwen's and SmolLM2's vocabulary sizes and one with a ragged tail,
float32 logits and bfloat16 ones (whose many exact ties would show any change of candidate order),
and some steps with a forced-token bitmask.

Two rules changed on purpose: equal values among a row's top k now come in the order of their ids,
lower first, where the sampler before took the order ``torch.topk`` happened to give them; and a
NaN ranks below every number. The copy's candidate search is replaced by the definition (a stable
full sort; these logits hold no NaN), so everything else it does is compared unchanged.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from qwen_gateway.engines.local import sampling
from tests.unit.engines import reference_sampler as before


def _settings(rng: random.Random, row: int) -> sampling.ResolvedSampling:
    temperature = rng.choice([0.0, 0.3, 0.7, 1.0, 1.3])
    return sampling.ResolvedSampling(
        temperature=temperature,
        top_p=rng.choice([1.0, 0.8, 0.95, 0.5]),
        top_k=rng.choice([0, 0, 1, 5, 20, 50]),
        repetition_penalty=rng.choice([1.0, 1.05, 1.3]),
        presence_penalty=rng.choice([0.0, 0.0, 0.5]),
        frequency_penalty=rng.choice([0.0, 0.3]),
        # Only seeded (or greedy) rows have tokens that can be compared: unseeded ones share a
        # generator whose draws need only be independent.
        seed=rng.randrange(1 << 30) + row,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [151_936, 151_900, 49_152])
def test_the_same_tokens_as_the_sampler_before(
    vocab: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    def by_definition(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, ids = torch.sort(x, dim=-1, descending=True, stable=True)
        return values[:, :k], ids[:, :k]

    monkeypatch.setattr(before, "top_candidates", by_definition)
    picks = 0
    for trial in range(4):
        rng = random.Random(vocab * 31 + trial)
        settings = [_settings(rng, i) for i in range(rng.choice([1, 3, 8]))]
        prompt = [rng.randrange(vocab) for _ in range(30)]
        exempt = {vocab - 1}
        new_rows = [sampling.Sampler(s, prompt, exempt=exempt) for s in settings]
        old_rows = [
            before.Sampler(before.ResolvedSampling(**dataclasses.asdict(s)), prompt, exempt) for s in settings
        ]
        new_sampler = sampling.BatchSampler(torch.Generator().manual_seed(1))
        old_sampler = before.BatchSampler(torch.Generator().manual_seed(1))
        gen = torch.Generator().manual_seed(trial)
        for _ in range(6):
            logits = torch.randn(len(settings), vocab, generator=gen) * rng.choice([1.0, 3.0, 6.0])
            if rng.random() < 0.5:  # a peaked distribution: the nucleus fits the candidates
                start = rng.randrange(vocab - 40)
                logits[:, start : start + 40] += torch.linspace(9.0, 4.0, 40)
            logits = logits.to(dtype)
            allowed = torch.rand(len(settings), vocab, generator=gen) < 0.3 if rng.random() < 0.2 else None
            want = old_sampler.sample(old_rows, logits, allowed)
            got = new_sampler.sample(new_rows, logits, allowed)
            assert got == want
            for new_row, old_row, token in zip(new_rows, old_rows, want, strict=True):
                new_row.observe(token)
                old_row.observe(token)
            picks += len(want)
    assert picks >= 4 * 6
