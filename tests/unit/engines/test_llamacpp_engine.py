"""LlamaCppEngine on the tiny Qwen GGUFs, in-process: prompts equal the transformers tokenizer's,
batching (several sequences in one llama_decode), seeds, stops, limits, thinking budget, cancel, crash.

Random weights: output is meaningless; tests use seeded sampling where they need varied tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qwen_gateway.engines.base import ChatMessage, EngineState, Thinking
from qwen_gateway.errors import EngineUnavailable
from qwen_gateway.settings import ModelConfig, Settings
from tests.unit.engines.local_helpers import MODELS, QWEN25, answer, collect, request, run, text_of

pytest.importorskip("llama_cpp")

GGUF25 = MODELS / "tiny-gguf" / "tiny-qwen2.5-f16.gguf"
GGUF3 = MODELS / "tiny-gguf" / "tiny-qwen3-f16.gguf"
VARIED: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


def make(path: Path, home: Path, **options: Any) -> Any:
    from qwen_gateway.engines.registry import create_engine

    config = ModelConfig.model_validate({"id": "tiny", "path": str(path), **options})
    assert config.engine == "llamacpp"  # a .gguf without `engine` goes to llama.cpp
    engine = create_engine(config, Settings(home=home))
    run(engine.start())
    return engine


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    engine = make(GGUF25, tmp_path_factory.mktemp("home"), max_batch_size=4)
    yield engine
    run(engine.aclose())


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    engine = make(GGUF3, tmp_path_factory.mktemp("home"))
    yield engine
    run(engine.aclose())


def test_prompt_ids_equal_the_transformers_tokenizer(qwen25: Any) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(QWEN25)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "你好,请介绍一下你自己 🌟 <tool_call> and   spaces\n\nnew lines"},
    ]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    req = request(messages=tuple(ChatMessage(m["role"], m["content"]) for m in messages))  # type: ignore[arg-type]
    ids = qwen25._renderer.render(req)
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]


def test_capabilities(qwen25: Any, qwen3: Any) -> None:
    caps = qwen25.capabilities
    assert caps.max_concurrency == 4 and caps.tools and caps.tool_format == "hermes"
    assert caps.constraints == frozenset() and not caps.logprobs
    assert caps.special_tokens["<tool_call>"] == 151657 and caps.special_tokens["<|im_end|>"] == 151645
    assert qwen3.capabilities.reasoning and qwen3.capabilities.thinking_budget


def test_max_tokens_and_usage(qwen25: Any) -> None:
    _, done = run(answer(qwen25, request(max_tokens=7, seed=3, **VARIED)))
    assert done.usage.completion_tokens <= 7
    if done.reason == "length":
        assert done.usage.completion_tokens == 7
    assert done.usage.prompt_tokens == len(qwen25._renderer.render(request()))


def test_seed_repeats_and_differs(qwen25: Any) -> None:
    a = run(answer(qwen25, request(max_tokens=24, seed=11, **VARIED)))[0]
    b = run(answer(qwen25, request(max_tokens=24, seed=11, **VARIED)))[0]
    c = run(answer(qwen25, request(max_tokens=24, seed=12, **VARIED)))[0]
    assert a == b and a != c


def test_stop_string_cuts_the_answer(qwen25: Any) -> None:
    full, _ = run(answer(qwen25, request(max_tokens=32, seed=5, **VARIED)))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip()
    cut, done = run(answer(qwen25, request(max_tokens=32, seed=5, stop=(stop,), **VARIED)))
    assert done.reason == "stop" and cut == full[: full.index(stop)]


def test_two_requests_decode_in_one_step(qwen25: Any) -> None:
    """Two generations in flight at once share llama_decode calls: shown by the scheduler's widest
    step (sequences in one decode call), not by timing."""

    async def main() -> None:
        a = qwen25.generate(request(max_tokens=40, seed=1, request_id="a", **VARIED))
        b = qwen25.generate(request(max_tokens=40, seed=2, request_id="b", **VARIED))
        first_a = await a.__anext__()
        first_b = await b.__anext__()  # b has started while a is unfinished
        assert first_a.text and first_b.text
        rest_a, rest_b = await asyncio.gather(collect(a), collect(b))
        assert rest_a[1].usage.completion_tokens >= 1 and rest_b[1].usage.completion_tokens >= 1

    qwen25.scheduler.widest_step = 0
    run(main())
    assert qwen25.scheduler.widest_step >= 2


def test_a_repeated_prompt_reuses_the_kept_prefix(qwen25: Any) -> None:
    """A finished request's KV cells stay under its seq id: the same prompt again prefills only its
    last token (the one whose logits start the answer), and the answer is the one computed afresh."""
    first, done = run(answer(qwen25, request("Reuse me, please.", max_tokens=12, temperature=0.0)))
    before = qwen25.scheduler.reused_tokens
    again, _ = run(answer(qwen25, request("Reuse me, please.", max_tokens=12, temperature=0.0)))
    assert qwen25.scheduler.reused_tokens - before == done.usage.prompt_tokens - 1
    assert again == first


def test_kept_cells_make_room_for_new_requests(tmp_path: Path) -> None:
    """Kept cells count against the cache: after two answers that filled it were kept, a long one
    runs to its length (the other kept cells are dropped, else llama_decode would run out of cells
    and the inference thread would stop)."""
    engine = make(GGUF25, tmp_path, max_batch_size=2, kv_cache_tokens=256)
    try:
        prompt = len(engine._renderer.render(request("Story 1.")))

        async def pair() -> list[Any]:
            return list(
                await asyncio.gather(
                    *(
                        answer(engine, request(t, max_tokens=128 - prompt, seed=i, request_id=t, **VARIED))
                        for i, t in enumerate(("Story 1.", "Story 2."))
                    )
                )
            )

        for _, done in run(pair()):
            assert done.usage.completion_tokens >= 1
        _, done = run(answer(engine, request("Story 3.", max_tokens=200 - prompt, seed=3, **VARIED)))
        assert done.reason == "length" and done.usage.completion_tokens == 200 - prompt
        assert engine.scheduler.alive and engine.scheduler.widest_step == 2
        assert engine.scheduler.reused_tokens > 0  # the system prompt the three share, at least
    finally:
        run(engine.aclose())


def test_prefix_cache_can_be_turned_off(tmp_path: Path) -> None:
    engine = make(GGUF25, tmp_path, prefix_cache=False)
    try:
        a = run(answer(engine, request(max_tokens=8, temperature=0.0)))[0]
        b = run(answer(engine, request(max_tokens=8, temperature=0.0)))[0]
        assert a == b and engine.scheduler.reused_tokens == 0
    finally:
        run(engine.aclose())


def test_cancel_frees_the_slot(qwen25: Any) -> None:
    async def main() -> None:
        stream = qwen25.generate(request(max_tokens=4000, seed=4, **VARIED))
        await stream.__anext__()
        assert (await qwen25.health()).active_generations == 1
        await stream.aclose()
        for _ in range(2000):  # one scheduler step (milliseconds); the bound is far beyond it
            if (await qwen25.health()).active_generations == 0:
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the cancelled sequence still holds its slot")

    run(main())


def test_thinking_budget_closes_the_block(qwen3: Any) -> None:
    req = request(max_tokens=6, seed=8, thinking=Thinking(True, budget=5), **VARIED)
    deltas, done = run(collect(qwen3.generate(req)))
    text = text_of(deltas)
    assert "</think>" in text
    assert done.usage.reasoning_tokens <= 5
    specials = [tid for d in deltas for _, tid in (d.specials or ())]
    assert 151668 in specials  # </think> marked as the special token it is


def test_an_inference_thread_crash_shows_in_health(tmp_path: Path) -> None:
    """A decode that fails (a token id outside the vocabulary, which llama_decode refuses: a real
    fault of the real part) stops the inference thread; health says so and requests are refused."""
    from qwen_gateway.engines.llamacpp.sequence import Sequence
    from qwen_gateway.engines.rules import ResolvedSampling

    engine = make(GGUF25, tmp_path)
    try:
        errors: list[BaseException] = []
        bad = Sequence(
            request_id="bad",
            prompt_ids=[engine._model.n_vocab + 10],
            max_new_tokens=4,
            max_total_tokens=4,
            sampling=ResolvedSampling(),
            eos_ids=frozenset(),
            stop_token_ids=(),
            emit=lambda item: errors.append(item) if isinstance(item, BaseException) else None,
        )
        engine.scheduler.submit(bad)
        engine.scheduler._thread.join(timeout=60)
        health = run(engine.health())
        assert health.state is EngineState.FAILED and "RuntimeError" in (health.detail or "")
        assert errors  # the sequence in flight was ended with an error, not left waiting
        with pytest.raises(EngineUnavailable):
            run(answer(engine, request()))
    finally:
        run(engine.aclose())


def test_greedy_tokens_are_llama_cpps_greedy_choice(qwen25: Any) -> None:
    """Greedy rows take numpy's argmax of the logits row (not llama.cpp's greedy sampler, which copies
    the row first): the ids are the ones llama.cpp's own greedy sampler picks, replayed on a context
    of its own."""
    import threading

    import llama_cpp.llama_cpp as C

    from qwen_gateway.engines.llamacpp.model import ContextShape
    from qwen_gateway.engines.llamacpp.sequence import Sequence, Tokens
    from qwen_gateway.engines.rules import ResolvedSampling

    model = qwen25._model
    prompt = model.tokenize("<|im_start|>user\nTell me about lighthouses<|im_end|>\n<|im_start|>assistant\n")
    done = threading.Event()
    seq = Sequence(
        request_id="greedy",
        prompt_ids=list(prompt),
        max_new_tokens=12,
        max_total_tokens=12,
        sampling=ResolvedSampling(temperature=0.0),
        eos_ids=frozenset(),
        stop_token_ids=(),
        emit=lambda item: done.set() if not isinstance(item, Tokens) or item.finish else None,
    )
    qwen25.scheduler.submit(seq)
    assert done.wait(timeout=120)
    assert len(seq.generated) == 12

    ctx = model.new_context(ContextShape(kv_tokens=256, max_sequences=1, batch_tokens=64, threads=1))
    batch = C.llama_batch_init(64, 0, 1)
    greedy = C.llama_sampler_init_greedy()
    try:
        replay: list[int] = []
        feed = list(prompt)
        for _ in range(12):
            start = len(prompt) + len(replay) - len(feed)
            for i, token in enumerate(feed):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, i == len(feed) - 1
            batch.n_tokens = len(feed)
            assert C.llama_decode(ctx, batch) == 0
            replay.append(int(C.llama_sampler_sample(greedy, ctx, len(feed) - 1)))
            feed = [replay[-1]]
    finally:
        C.llama_sampler_free(greedy)
        C.llama_batch_free(batch)
        C.llama_free(ctx)
    assert seq.generated == replay
