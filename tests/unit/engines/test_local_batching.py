"""The batched engine's parts: the block KV pool, the batched sampler and its bitmask, thinking
budgets, M-RoPE positions on the VL checkpoints, and no deprecation warnings from our own calls."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from qwen_gateway.engines.base import SamplingParams, Thinking
from qwen_gateway.engines.local import kvcache
from qwen_gateway.engines.local.masks import ForcedTokens, batch_bitmask
from qwen_gateway.engines.local.sampling import BatchSampler, GenerationDefaults, ResolvedSampling, Sampler
from qwen_gateway.engines.local.sequence import Sequence, Tokens
from qwen_gateway.errors import EngineOverloaded
from tests.unit.engines.local_helpers import (
    MODELS,
    QWEN3,
    QWEN25,
    Recorder,
    answer,
    install_masks,
    remove_masks,
    request,
    run,
)

GREEDY_VARIED: dict[str, Any] = {"temperature": 0.0, "repetition_penalty": 1.8, "presence_penalty": 1.5}


def resolve(**kw: Any) -> ResolvedSampling:
    return ResolvedSampling.resolve(SamplingParams(max_tokens=8, **kw), GenerationDefaults())


# -- the pool ----------------------------------------------------------------------------------------


def test_rows_take_and_return_blocks_without_moving_the_others() -> None:
    pool = kvcache.BlockPool(capacity_tokens=1024)
    a, b, c = kvcache.RowKV(), kvcache.RowKV(), kvcache.RowKV()
    for row, n in ((a, 20), (b, 5), (c, 40)):
        pool.grow(row, n)
        row.length = n  # the backend commits lengths after the forward pass
    before = a.slots.clone()
    pool.release(b)
    pool.grow(a, 30)  # a grows past its blocks: new blocks, its old slots stay where they were
    assert torch.equal(a.slots[:32], before)
    assert len(a.blocks) == -(-50 // 16) and len(c.blocks) == -(-40 // 16)
    # Lowest blocks first: the block b returned is reused, so the peak is the most in use at once.
    assert 2 in a.blocks and pool.peak_in_use == pool.in_use == 4 + 3


def test_an_exhausted_pool_refuses_without_taking_anything() -> None:
    pool = kvcache.BlockPool(capacity_tokens=1024, budget_tokens=32)
    row = kvcache.RowKV()
    pool.grow(row, 30)
    other = kvcache.RowKV()
    with pytest.raises(kvcache.PoolExhausted):
        pool.grow(other, 20)
    assert other.blocks == [] and pool.in_use == 2


# -- the batched sampler and the bitmask ----------------------------------------------------------------


def test_a_row_samples_the_same_alone_and_beside_other_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=gen) * 3
    settings = [
        resolve(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05, seed=1),
        resolve(temperature=1.0, seed=2),
        resolve(temperature=0.0),
        resolve(temperature=0.9, top_p=0.9, seed=3, presence_penalty=0.5),
        resolve(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05, seed=4),
        resolve(temperature=1.2, top_k=50, seed=5),
    ]

    def draws(batch: bool) -> list[list[int]]:
        rows = [Sampler(s, prompt_ids=[1, 2, 3]) for s in settings]
        out: list[list[int]] = [[] for _ in rows]
        for _ in range(20):
            if batch:
                tokens = BatchSampler().sample(rows, logits)
            else:
                tokens = [BatchSampler().sample([r], logits[i : i + 1])[0] for i, r in enumerate(rows)]
            for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
                row.observe(token)
                out[i].append(token)
        return out

    alone, together = draws(False), draws(True)
    seeded_or_greedy = [i for i, s in enumerate(settings) if s.seed is not None or s.greedy]
    assert [alone[i] for i in seeded_or_greedy] == [together[i] for i in seeded_or_greedy]
    assert len(set(together[1])) > 5  # sampled, not stuck


def test_the_bitmask_restricts_only_its_rows() -> None:
    """A mask source allowing a token set, in a batch with unrestricted rows of every kind."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3000, generator=gen)
    allowed_ids = torch.tensor([7, 99, 2500])

    class OnlySome:
        def allowed(self, generated: Any) -> Any:
            return allowed_ids

    def seqs(masked: bool) -> list[Sequence]:
        out = []
        for i, s in enumerate(
            [
                resolve(temperature=1.0, seed=1),
                resolve(temperature=0.0),
                resolve(temperature=1.0, seed=3),
                resolve(temperature=0.8, top_k=40, seed=4),
            ]
        ):
            masks = [OnlySome()] if masked and i in (0, 1) else []
            out.append(
                Sequence(
                    request_id=f"r{i}",
                    prompt_ids=[1],
                    max_new_tokens=50,
                    sampler=Sampler(s, [1]),
                    eos_ids=frozenset(),
                    stop_token_ids=(),
                    emit=lambda _item: None,
                    masks=masks,
                )
            )
        return out

    plain, masked = seqs(False), seqs(True)
    for _ in range(30):
        free = BatchSampler().sample([s.sampler for s in plain], logits, batch_bitmask(plain, 3000))
        bitmask = batch_bitmask(masked, 3000)
        assert bitmask is not None and bitmask[2:].all() and int(bitmask[0].sum()) == 3
        got = BatchSampler().sample([s.sampler for s in masked], logits, bitmask)
        assert got[0] in allowed_ids.tolist() and got[1] in allowed_ids.tolist()
        assert got[2:] == free[2:]  # the unrestricted rows drew exactly as without any mask
    assert batch_bitmask(plain, 3000) is None


def test_forced_tokens_in_a_batch_of_mixed_rows(engine_factory: Callable[..., Any]) -> None:
    engine = engine_factory(QWEN25, id="forced-batch")
    tok = engine._loaded.tokenizer
    target = tok("The lighthouse stands tall.", add_special_tokens=False)["input_ids"]
    others = [
        request(p, max_tokens=20, request_id=f"o{i}", **GREEDY_VARIED) for i, p in enumerate(["Hi", "Yo"])
    ]
    solo = [run(answer(engine, r)) for r in others]
    install_masks(engine, lambda req: [ForcedTokens(target)] if req.request_id == "forced" else [])
    try:

        async def together() -> list[Any]:
            forced = request("anything", max_tokens=len(target), request_id="forced", temperature=1.0, seed=9)
            return list(await asyncio.gather(answer(engine, forced), *(answer(engine, r) for r in others)))

        (text, finished), *rest = run(together())
    finally:
        remove_masks(engine)
    assert text == "The lighthouse stands tall." and finished.usage.completion_tokens == len(target)
    assert rest == solo


def test_seeded_default_sampling_is_the_same_alone_and_in_a_batch(engine_factory: Callable[..., Any]) -> None:
    """Checkpoint defaults (top_k 20, top_p 0.8, repetition penalty 1.05) with a seed."""
    engine = engine_factory(QWEN25, id="seeded-batch")
    mine = request(max_tokens=24, seed=42, request_id="mine")
    alone = run(answer(engine, mine))

    async def crowd() -> list[Any]:
        noise = [request(f"Other {i}", max_tokens=30, seed=i, request_id=f"n{i}") for i in range(5)]
        noise.append(request("Greedy one", max_tokens=30, temperature=0.0, request_id="g"))
        return list(await asyncio.gather(answer(engine, mine), *(answer(engine, r) for r in noise)))

    assert run(crowd())[0] == alone


# -- thinking budget -----------------------------------------------------------------------------------


def test_thinking_budget_forces_the_close_then_lets_it_answer(engine_factory: Callable[..., Any]) -> None:
    engine = engine_factory(QWEN3, id="think-budget")
    qwen25 = engine_factory(QWEN25, id="no-think")
    # Every checkpoint can think: one without <think> tokens gets the close forced as plain tokens.
    assert engine.capabilities.thinking_budget and qwen25.capabilities.thinking_budget
    tok = engine._loaded.tokenizer
    close = tok("\n</think>\n\n", add_special_tokens=False)["input_ids"]
    original = engine._token_masks
    recorder = Recorder()
    install_masks(engine, lambda req: [*original(req), recorder])
    try:
        req = request("Why?", max_tokens=30, seed=3, temperature=1.0, top_p=1.0, top_k=0)
        budgeted = request(
            "Why?",
            max_tokens=30,
            seed=3,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            thinking=Thinking(enabled=True, budget=6),
        )
        run(answer(engine, req))
        free = list(recorder.seen)
        text, finished = run(answer(engine, budgeted))
        ids = list(recorder.seen)
    finally:
        remove_masks(engine)
    end_id = tok.convert_tokens_to_ids("</think>")
    assert end_id not in free[:6]  # random weights never close on their own this early
    assert ids[:6] == free[:6]  # the budget changes nothing before it runs out
    assert ids[6 : 6 + len(close)] == close  # then the close is forced
    # max_tokens caps the answer alone, counted from just after "</think>": it goes on for 30 more.
    assert len(ids) == finished.usage.completion_tokens == 6 + close.index(end_id) + 1 + 30
    assert finished.usage.reasoning_tokens == 6  # the forced close is not reasoning
    assert "</think>" in text


# -- M-RoPE: VL checkpoints decode the same batched as alone -------------------------------------------


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_vl_checkpoints_batched_decode_equals_single_row(name: str) -> None:
    from transformers import AutoModelForImageTextToText

    from qwen_gateway.engines.local.backends import BatchedBackend, uses_mrope

    model = AutoModelForImageTextToText.from_pretrained(str(MODELS / name), dtype=torch.float32).eval()
    assert uses_mrope(model)
    backend = BatchedBackend(model, torch.device("cpu"), capacity_tokens=4096, budget_tokens=None)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 5000, (n,), generator=gen).tolist() for n in (5, 37, 12)]

    def make(i: int, out: list[int]) -> Sequence:
        def emit(item: Any) -> None:
            assert isinstance(item, Tokens)
            out.extend(item.ids)

        return Sequence(
            request_id=f"v{i}",
            prompt_ids=prompts[i],
            max_new_tokens=8,
            sampler=Sampler(resolve(**GREEDY_VARIED), prompts[i]),
            eos_ids=frozenset(),
            stop_token_ids=(),
            emit=emit,
        )

    def fail(_seq: Sequence, exc: BaseException) -> None:
        raise exc

    def run_to_end(seqs: list[Sequence], chunk: int) -> None:
        with torch.inference_mode():
            while not all(s.finished for s in seqs):
                work = [(s, min(chunk, len(s.prompt_ids) - s.prefilled)) for s in seqs if not s.prefill_done]
                decoding = [s for s in seqs if s.prefill_done and not s.finished]
                backend.step(decoding, work[:1], fail)
        backend.remove(seqs)

    alone: list[list[int]] = []
    for i in range(3):
        out: list[int] = []
        run_to_end([make(i, out)], chunk=64)
        alone.append(out)
    outs: list[list[int]] = [[], [], []]
    run_to_end([make(i, outs[i]) for i in range(3)], chunk=10)  # chunks ride along decoding rows
    assert outs == alone and all(len(o) == 8 for o in alone)
    assert backend.pool.in_use == 0


# -- faults and warnings --------------------------------------------------------------------------------


def test_a_request_the_kv_budget_cannot_hold_is_overloaded_alone(engine_factory: Callable[..., Any]) -> None:
    engine = engine_factory(QWEN25, id="kv-budget")
    engine._scheduler._backend.pool = kvcache.BlockPool(capacity_tokens=100_000, budget_tokens=160)

    async def main() -> list[Any]:
        small = answer(engine, request("Hi", max_tokens=40, seed=1, temperature=1.0, request_id="small"))
        big = answer(engine, request("word " * 200, max_tokens=5, request_id="big"))
        return list(await asyncio.gather(small, big, return_exceptions=True))

    small, big = run(main())
    assert isinstance(big, EngineOverloaded)
    assert small[1].usage.completion_tokens == 40
    assert run(engine.health()).active_generations == 0


@pytest.mark.parametrize("scheduler", ["batched", "interleaved"])
def test_generation_emits_no_deprecation_warning(engine_factory: Callable[..., Any], scheduler: str) -> None:
    engine = engine_factory(QWEN25, scheduler=scheduler, id=f"warn-{scheduler}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # process-wide: a warning on the inference thread fails the request

        async def two() -> list[Any]:
            reqs = [request(p, max_tokens=6, seed=i, temperature=1.0) for i, p in enumerate(["a", "b c"])]
            return list(await asyncio.gather(*(answer(engine, r) for r in reqs)))

        results = run(two())
    assert [f.usage.completion_tokens for _, f in results] == [6, 6]
