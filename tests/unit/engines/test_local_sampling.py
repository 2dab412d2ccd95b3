"""Token choice: defaults, greedy, penalties, top-k/top-p and per-request generators."""

from __future__ import annotations

import pytest
import torch

from qwen_gateway.engines.base import SamplingParams
from qwen_gateway.engines.local import sampling
from qwen_gateway.engines.local.sampling import BatchSampler, GenerationDefaults, ResolvedSampling, Sampler


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
    # The tokens whose preceding mass is within top_p (one tensor comparison: a Python loop over the
    # 150k elements took 1.5 s of CPU).
    return set(indices[cumulative - values <= top_p].tolist())


# Flat is slow (4-7 s: 300 draws that each sort the 150k-token row, the path under test): out of the
# quick run (`-m "not slow"`), in CI.
@pytest.mark.parametrize("peaked", [True, pytest.param(False, marks=pytest.mark.slow)])
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


@pytest.mark.parametrize("vocab", [151_936, 151_900, 49_152, 1000])
def test_the_block_search_finds_what_a_full_search_finds(vocab: int) -> None:
    """top_candidates/first_argmax search block maxima first (a small vocabulary is read whole);
    they must give a stable full sort's answer, equal values lowest id first: with a ragged tail,
    masked rows, a maximum that occurs twice and bfloat16 values' many ties, at every width."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, vocab, generator=gen) * 3
    x[1, :-5] = float("-inf")  # only the tail's ids are left (a constraint mask)
    x[2, 500:] = float("-inf")  # a mask that leaves the first 500 ids
    x[3, 7] = x[3, vocab - 3] = x[3].max() + 1  # a tie for the maximum: the first id wins
    x[4, 70_000 % vocab] = 50.0  # one dominant id
    x[6] = x[6].to(torch.bfloat16).float()  # a row of ties
    want_values, want_ids = torch.sort(x, dim=-1, descending=True, stable=True)
    for k in (1, 5, 20, 32, 33, 40, 256):
        values, ids = sampling.top_candidates(x, k)
        assert torch.equal(values, want_values[:, :k]), k
        assert torch.equal(ids, want_ids[:, :k]), k
    assert torch.equal(sampling.first_argmax(x), torch.argmax(x, dim=-1))
    assert int(sampling.first_argmax(x)[3]) == 7


def test_a_seeded_row_samples_the_same_alone_and_in_a_batch_over_a_full_vocabulary() -> None:
    """The batch-wide candidate search (one search at the widest width) on a Qwen-sized vocabulary:
    a row's tokens do not depend on the rows beside it, whatever their widths and penalties."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 151_936, generator=gen) * 4
    logits[:, 100:140] += torch.linspace(9.0, 5.0, 40)
    settings = [
        resolve(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05, seed=1),
        resolve(temperature=0.9, top_k=50, repetition_penalty=1.3, seed=2),
        resolve(temperature=0.0, repetition_penalty=1.2),
        resolve(temperature=1.0, top_p=0.9, seed=3),
        resolve(temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.05, seed=4),
    ]

    def draws(batch: bool) -> list[list[int]]:
        rows = [Sampler(s, prompt_ids=[101, 102, 103]) for s in settings]
        sampler = BatchSampler()
        singles = [BatchSampler() for _ in rows]
        out: list[list[int]] = [[] for _ in rows]
        for _ in range(12):
            if batch:
                tokens = sampler.sample(rows, logits)
            else:
                tokens = [singles[i].sample([r], logits[i : i + 1])[0] for i, r in enumerate(rows)]
            for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
                row.observe(token)
                out[i].append(token)
        return out

    assert draws(False) == draws(True)


def test_tied_logits_give_a_seeded_row_the_same_token_beside_a_wider_search() -> None:
    """Equal logits (common in bfloat16) are ordered lowest id first at every search width, so a
    seeded top-k row draws the same token alone and beside a nucleus row that widens the batch's
    search to 256 candidates (torch.topk's order among ties differed between the widths)."""
    x = torch.randn(2, 151_936, generator=torch.Generator().manual_seed(0))
    x[:, 70_000] = x[:, 90_000] = 8.0  # two tied best tokens
    differ, tied = [], 0
    for seed in range(40):
        alone = BatchSampler().sample([Sampler(resolve(top_k=20, seed=seed), [])], x[:1].clone())[0]
        rows = [Sampler(resolve(top_k=20, seed=seed), []), Sampler(resolve(top_p=0.9, seed=1), [])]
        beside = BatchSampler().sample(rows, x.clone())[0]
        tied += alone in (70_000, 90_000)
        if alone != beside:
            differ.append(seed)
    assert differ == []
    assert tied >= 20  # most draws land on the tie, where the order decides the token


def test_nan_logits_are_never_chosen_over_numbers() -> None:
    x = torch.randn(2, 151_936, generator=torch.Generator().manual_seed(1))
    x[0, 1] = float("nan")  # hides its block's real maximum
    x[0, 2] = 30.0  # in the same block as the NaN
    x[1, :1000] = float("nan")
    x[1, 151_935] = 30.0  # in the ragged-free last block
    assert sampling.first_argmax(x).tolist() == [2, 151_935]
    values, ids = sampling.top_candidates(x, 5)
    assert ids[:, 0].tolist() == [2, 151_935] and not torch.isnan(values).any()
    row = Sampler(resolve(temperature=0.7, top_k=20, seed=3), [])
    assert BatchSampler().sample([row], x[:1].clone()) == [2]


def test_a_tensor_that_requires_grad_is_sampled_as_any_other() -> None:
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(2))
    settings = resolve(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1, seed=9)
    want = Sampler(settings, [1, 2, 3]).sample(x[0])
    assert Sampler(settings, [1, 2, 3]).sample(x[0].clone().requires_grad_()) == want
    assert torch.equal(
        sampling.top_candidates(x.clone().requires_grad_(), 5)[1], sampling.top_candidates(x, 5)[1]
    )


@pytest.mark.parametrize("k", [0, 11, 40])
def test_a_search_wider_than_the_vocabulary_or_empty_is_refused(k: int) -> None:
    with pytest.raises(ValueError, match="best of 10 ids"):
        sampling.top_candidates(torch.randn(2, 10), k)
