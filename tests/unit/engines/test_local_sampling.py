"""Token choice: defaults, greedy, penalties, top-k/top-p and per-request generators."""

from __future__ import annotations

import pytest
import torch

from qwen_gateway.engines.base import SamplingParams
from qwen_gateway.engines.local.sampling import GenerationDefaults, ResolvedSampling, Sampler


class _GenConfig:
    temperature = 0.7
    top_p = 0.8
    top_k = 20
    repetition_penalty = 1.05


def resolve(**kw: object) -> ResolvedSampling:
    defaults = kw.pop("defaults", GenerationDefaults())
    assert isinstance(defaults, GenerationDefaults)
    return ResolvedSampling.resolve(SamplingParams(max_tokens=8, **kw), defaults)  # type: ignore[arg-type]


def test_defaults_come_from_generation_config_then_fall_back() -> None:
    qwen = GenerationDefaults.from_generation_config(_GenConfig())
    s = resolve(defaults=qwen)
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    s = resolve(defaults=qwen, temperature=0.0, top_k=0, top_p=0.5, repetition_penalty=1.0)
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.0, 0.5, 0, 1.0)
    bare = resolve(defaults=GenerationDefaults.from_generation_config(None))
    assert (bare.temperature, bare.top_p, bare.top_k, bare.repetition_penalty) == (1.0, 1.0, 0, 1.0)


def test_greedy_and_top_k_one_take_the_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(resolve(temperature=0.0), []).sample(logits) == 1
    assert Sampler(resolve(temperature=1.5, top_k=1, seed=1), []).sample(logits) == 1


def test_repetition_penalty_uses_hf_semantics_over_prompt_and_output() -> None:
    s = Sampler(resolve(temperature=0.0, repetition_penalty=2.0), prompt_ids=[0])
    # token 0 (seen in the prompt): 3.0 -> 1.5 < token 1's 2.0
    assert s.sample(torch.tensor([3.0, 2.0, -5.0])) == 1
    s.observe(1)
    # token 1 now seen too: 2.0 -> 1.0; a negative seen logit grows more negative
    out = s.penalize(torch.tensor([3.0, 2.0, -1.0]))
    assert torch.allclose(out, torch.tensor([1.5, 1.0, -1.0]))


def test_repetition_penalty_spares_the_end_of_turn_ids() -> None:
    # Every chat prompt ends its turns with the EOS id (2 here): penalizing it would only make the
    # answer less likely to end.
    s = Sampler(resolve(temperature=0.0, repetition_penalty=2.0), prompt_ids=[0, 2], exempt=[2])
    s.observe(2)
    out = s.penalize(torch.tensor([3.0, 2.0, 4.0]))
    assert torch.allclose(out, torch.tensor([1.5, 2.0, 4.0]))


def test_presence_and_frequency_penalties_use_openai_semantics() -> None:
    s = Sampler(resolve(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25), prompt_ids=[2])
    s.sample(torch.zeros(3))
    for token in (0, 0, 1):
        s.observe(token)
    out = s.penalize(torch.zeros(3))
    # token 0: 2 x 0.25 + 0.5; token 1: 0.25 + 0.5; token 2 is only in the prompt: untouched
    assert torch.allclose(out, torch.tensor([-1.0, -0.75, 0.0]))


def test_top_p_keeps_the_nucleus_and_never_nothing() -> None:
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    picks = {Sampler(resolve(temperature=1.0, top_p=0.5, seed=i), []).sample(logits) for i in range(40)}
    assert picks == {0}
    picks = {Sampler(resolve(temperature=1.0, top_p=0.85, seed=i), []).sample(logits) for i in range(80)}
    assert picks == {0, 1}
    picks = {Sampler(resolve(temperature=1.0, top_k=2, seed=i), []).sample(logits) for i in range(80)}
    assert picks == {0, 1}


def test_seeded_generators_are_private_and_repeatable() -> None:
    logits = torch.zeros(1000)

    def draw(seed: int | None) -> list[int]:
        s = Sampler(resolve(temperature=1.0, seed=seed), [])
        return [s.sample(logits) for _ in range(10)]

    torch.manual_seed(0)
    a = draw(7)
    torch.manual_seed(123)  # the global seed plays no part
    assert draw(7) == a
    assert draw(8) != a
    assert draw(None) != draw(None)


def _reference_nucleus(logits: torch.Tensor, top_p: float) -> set[int]:
    probs = torch.softmax(logits, dim=-1)
    values, indices = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(values, dim=-1)
    return {int(i) for i, c, p in zip(indices, cumulative, values, strict=True) if c - p <= top_p}


@pytest.mark.parametrize("peaked", [True, False])
def test_top_p_over_a_large_vocabulary_is_the_exact_nucleus(peaked: bool) -> None:
    """Peaked: the nucleus sits in the top few hundred tokens (the fast path, no full sort).
    Flat: it doesn't, and the full sort is used. Either way only nucleus tokens are drawn, and the
    nucleus' tail is reached."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(150_000, generator=gen) * (0.5 if not peaked else 1.0)
    if peaked:
        logits[:40] += torch.linspace(14.0, 10.0, 40)
    nucleus = _reference_nucleus(logits, 0.9)
    assert (len(nucleus) < 256) == peaked
    picks = {Sampler(resolve(temperature=1.0, top_p=0.9, seed=i), []).sample(logits) for i in range(300)}
    assert picks <= nucleus
    if peaked:
        assert len(picks) > len(nucleus) // 3
