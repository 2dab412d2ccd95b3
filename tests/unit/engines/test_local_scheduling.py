"""Several requests at once on both schedulers; cancellation; faults inside the inference thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen_gateway.engines.base import EngineState, Finished, TextDelta
from qwen_gateway.engines.local import LocalEngine
from qwen_gateway.errors import EngineFailure, EngineOverloaded, EngineUnavailable
from qwen_gateway.settings import ModelConfig, Settings
from tests.unit.engines.local_helpers import (
    QWEN3,
    QWEN25,
    Forcer,
    answer,
    collect,
    install_masks,
    make_engine,
    remove_masks,
    request,
    run,
)

SCHEDULERS = ["batched", "interleaved"]
VARIED: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
# Greedy, but penalties keep random weights from repeating one token: varied and deterministic.
GREEDY_VARIED: dict[str, Any] = {"temperature": 0.0, "repetition_penalty": 1.8, "presence_penalty": 1.5}
PROMPTS = ["Hi", "Tell me a story about the sea, the sky and the mountains far away.", "What is 2+2?"]


class ForwardSpy:
    """Wraps the model's forward: records batch sizes and can fail on chosen inputs."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.original = model.forward
        self.batch_sizes: list[int] = []
        self.fail_when: Callable[[torch.Tensor], BaseException | None] = lambda _ids: None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"]
        self.batch_sizes.append(int(ids.shape[0]))
        error = self.fail_when(ids)
        if error is not None:
            raise error
        return self.original(*args, **kwargs)


@pytest.fixture(scope="module", params=SCHEDULERS)
def engine(request: pytest.FixtureRequest, engine_factory: Callable[..., Any]) -> Any:
    return engine_factory(QWEN25, scheduler=request.param, id=f"tiny-{request.param}")


@pytest.fixture
def spy(engine: Any) -> Iterator[ForwardSpy]:
    model = engine._loaded.model
    spy = ForwardSpy(model)
    model.forward = spy
    yield spy
    del model.forward  # back to the class's forward
    remove_masks(engine)


def test_scheduler_is_selected_by_config(tmp_path: Path) -> None:
    config = ModelConfig(id="qwen-plus", path=str(QWEN25), scheduler="interleaved")
    assert LocalEngine(config, settings=Settings(home=tmp_path)).scheduler_kind == "interleaved"
    assert make_engine(QWEN25, tmp_path).scheduler_kind == "batched"


def test_three_concurrent_requests_progress_together(engine: Any, spy: ForwardSpy) -> None:
    log: list[tuple[int, str]] = []

    async def one(i: int) -> None:
        async for event in engine.generate(request(PROMPTS[i], max_tokens=40, seed=i, **VARIED)):
            log.append((i, "delta" if isinstance(event, TextDelta) else "end"))

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(3)))

    run(main())
    first = {i: log.index((i, "delta")) for i in range(3)}
    end = {i: log.index((i, "end")) for i in range(3)}
    # Every request streamed before any other finished: nobody waited for another to end.
    assert all(first[i] < end[j] for i in range(3) for j in range(3))
    if engine.scheduler_kind == "batched":
        assert max(spy.batch_sizes) == 3  # decoded together in one forward pass
    else:
        assert max(spy.batch_sizes) == 1
    assert run(engine.health()).active_generations == 0


def test_concurrent_greedy_equals_solo_greedy(engine: Any) -> None:
    reqs = [request(p, max_tokens=24 + 4 * i, **GREEDY_VARIED) for i, p in enumerate(PROMPTS)]
    solo = [run(answer(engine, r)) for r in reqs]
    assert len({text for text, _ in solo}) == 3 and all(len(set(t)) > 3 for t, _ in solo)

    async def together() -> list[tuple[str, Finished]]:
        return list(await asyncio.gather(*(answer(engine, r) for r in reqs)))

    assert run(together()) == solo


def test_staggered_joins_and_leaves_match_solo_greedy(engine_factory: Callable[..., Any]) -> None:
    """Rows join (left-padding the batch) and leave (trimming it) at random moments, more requests
    than the batch holds: every answer is still the one it gets alone."""
    engine = engine_factory(QWEN3, max_batch_size=4, scheduler="batched", id="tiny-qwen3-staggered")
    prompts = [("word " * random.Random(i).randint(1, 40)) + f"q{i}" for i in range(8)]
    reqs = [request(p, max_tokens=6 + 5 * i, **GREEDY_VARIED) for i, p in enumerate(prompts)]
    solo = [run(answer(engine, r)) for r in reqs]

    async def staggered(i: int) -> tuple[str, Finished]:
        await asyncio.sleep(random.Random(100 + i).random() * 0.2)
        return await answer(engine, reqs[i])

    async def main() -> list[tuple[str, Finished]]:
        return list(await asyncio.gather(*(staggered(i) for i in range(len(reqs)))))

    assert run(main()) == solo


def test_late_joiner_does_not_wait_for_the_others(engine: Any) -> None:
    # Observed by order, not by timing: the short request, sent after the long one, is answered while
    # the long one is still generating (a wall-clock ratio here could flake on a busy machine).
    async def main() -> None:
        events = aiter(engine.generate(request(max_tokens=250, seed=1, **VARIED)))
        await anext(events)  # the long request is generating

        async def drain() -> None:
            async for _ in events:
                pass

        long = asyncio.create_task(drain())
        await answer(engine, request("Hi", max_tokens=5, seed=2, **VARIED))
        assert not long.done()
        await long

    run(main())


def test_extra_requests_wait_in_fifo_beyond_max_batch_size(engine_factory: Callable[..., Any]) -> None:
    engine = engine_factory(QWEN25, max_batch_size=1, id="tiny-cap1")
    order: list[str] = []
    running: list[int] = []
    held: list[int] = []

    async def one(name: str) -> None:
        async for event in engine.generate(request(max_tokens=15, seed=1, **VARIED)):
            if isinstance(event, Finished):
                order.append(name)
            running.append((await engine.health()).active_generations)
            held.append(engine._scheduler.held)

    async def main() -> None:
        tasks = []
        for name in "abc":
            tasks.append(asyncio.create_task(one(name)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)

    run(main())
    assert order == ["a", "b", "c"]
    assert max(held) == 3  # all three were in the engine at once, two of them waiting
    assert max(running) == 1  # and health counts only the one running as active
    assert run(engine.health()).active_generations == 0


# -- cancellation --------------------------------------------------------------------------------------------


def test_closing_the_stream_frees_the_engine_within_one_step(engine: Any) -> None:
    async def main() -> float:
        stream = engine.generate(request(max_tokens=5000, seed=9, **VARIED))
        n = 0
        async for _event in stream:
            n += 1
            if n == 5:
                break
        assert (await engine.health()).active_generations == 1
        await stream.aclose()
        closed = time.monotonic()
        while (await engine.health()).active_generations:
            assert time.monotonic() - closed < 1.0
            await asyncio.sleep(0.005)
        return time.monotonic() - closed

    assert run(main()) < 1.0


def test_cancelled_task_frees_running_and_queued_requests(engine_factory: Callable[..., Any]) -> None:
    engine = engine_factory(QWEN25, max_batch_size=1, id="tiny-cancel")

    async def main() -> None:
        running = asyncio.create_task(answer(engine, request(max_tokens=5000, seed=1, **VARIED)))
        queued = asyncio.create_task(answer(engine, request(max_tokens=5000, seed=2, **VARIED)))
        deadline = time.monotonic() + 60  # bounds for a wedged thread only: each wait is milliseconds
        while not ((await engine.health()).active_generations == 1 and engine._scheduler.held == 2):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        queued.cancel()
        running.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)
        while engine._scheduler.held or (await engine.health()).active_generations:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        # ... and it still serves.
        _, finished = await answer(engine, request(max_tokens=3, seed=3, **VARIED))
        assert finished.usage.completion_tokens == 3

    run(main())


# -- faults ------------------------------------------------------------------------------------------------------


def test_failing_prefill_fails_only_that_request(
    engine: Any, spy: ForwardSpy, caplog: pytest.LogCaptureFixture
) -> None:
    tok = engine._loaded.tokenizer
    marker = tok(" xylophone", add_special_tokens=False)["input_ids"][0]
    spy.fail_when = lambda ids: RuntimeError("injected fault") if bool((ids == marker).any()) else None

    async def main() -> None:
        ok = asyncio.create_task(answer(engine, request(max_tokens=30, seed=1, **VARIED)))
        await asyncio.sleep(0.01)
        with pytest.raises(EngineFailure) as info:
            await answer(engine, request("play the xylophone", max_tokens=30))
        assert info.value.message == "inference internal error."
        assert (await ok)[1].usage.completion_tokens == 30
        # The engine goes on serving.
        assert (await answer(engine, request(max_tokens=4, seed=2, **VARIED)))[1].reason == "length"

    with caplog.at_level(logging.ERROR, logger="qwen_gateway.engines.local"):
        run(main())
    assert any("injected fault" in (r.exc_text or "") for r in caplog.records)
    assert run(engine.health()).active_generations == 0
    assert run(engine.health()).state is EngineState.READY


def test_failing_decode_step_fails_only_that_request(engine: Any, spy: ForwardSpy) -> None:
    """The bad request's token breaks every forward pass it is part of (batched: the whole batch).
    The engine finds the culprit and the other requests carry on."""
    poison = 99999
    spy.fail_when = lambda ids: (
        RuntimeError("poisoned") if ids.shape[1] == 1 and bool((ids == poison).any()) else None
    )
    install_masks(engine, lambda req: [Forcer([poison])] if req.request_id == "bad" else [])

    async def main() -> None:
        good = [
            asyncio.create_task(
                answer(engine, request(p, max_tokens=20, request_id=f"good{i}", **GREEDY_VARIED))
            )
            for i, p in enumerate(PROMPTS[:2])
        ]
        await asyncio.sleep(0.01)
        with pytest.raises(EngineFailure):
            await answer(engine, request(max_tokens=20, request_id="bad", temperature=0.0))
        results = await asyncio.gather(*good)
        assert [f.usage.completion_tokens for _, f in results] == [20, 20]

    expected = [run(answer(engine, request(p, max_tokens=20, **GREEDY_VARIED)))[0] for p in PROMPTS[:2]]
    run(main())
    if engine.scheduler_kind == "batched":
        assert 3 in spy.batch_sizes  # the poisoned pass was a batch of all three
    assert run(engine.health()).active_generations == 0
    # The survivors' text is unaffected by the detour through single-row steps.
    remove_masks(engine)
    spy.fail_when = lambda _ids: None
    again = [run(answer(engine, request(p, max_tokens=20, **GREEDY_VARIED)))[0] for p in PROMPTS[:2]]
    assert again == expected


def test_out_of_memory_is_overloaded(engine: Any, spy: ForwardSpy) -> None:
    spy.fail_when = lambda _ids: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    with pytest.raises(EngineOverloaded):
        run(answer(engine, request(max_tokens=3)))
    spy.fail_when = lambda _ids: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
    )
    with pytest.raises(EngineOverloaded):
        run(answer(engine, request(max_tokens=3)))
    spy.fail_when = lambda _ids: None
    assert run(answer(engine, request(max_tokens=3, seed=1, **VARIED)))[1].reason == "length"


def test_aclose_fails_running_requests_and_refuses_new_ones(tmp_path: Path) -> None:
    engine = make_engine(QWEN25, tmp_path)

    async def main() -> None:
        with pytest.raises(EngineUnavailable):  # not started yet
            await answer(engine, request())
        await engine.start()
        stream = engine.generate(request(max_tokens=5000, seed=1, **VARIED))
        first = await stream.__anext__()
        assert isinstance(first, TextDelta)
        closing = asyncio.create_task(engine.aclose())
        with pytest.raises(EngineUnavailable):
            async for _event in stream:
                pass
        await closing
        health = await engine.health()
        assert health.state is EngineState.CLOSED and health.active_generations == 0
        with pytest.raises(EngineUnavailable):
            await answer(engine, request())

    run(main())


def test_events_after_the_consumer_loop_closed_are_dropped(engine: Any) -> None:
    """A consumer whose event loop ended without closing its stream must not wedge the thread."""

    async def abandon() -> None:
        stream = engine.generate(request(max_tokens=5000, seed=1, **VARIED))
        await stream.__anext__()
        # The loop ends here; asyncio.run closes the async generator, which cancels the request.

    run(abandon())
    deadline = time.monotonic() + 30  # a bound for a wedged thread only: the reap takes milliseconds
    while run(engine.health()).active_generations:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert run(answer(engine, request(max_tokens=2, seed=1, **VARIED)))[1].usage.completion_tokens == 2


def test_collect_helper_sees_usage_on_every_delta(engine: Any) -> None:
    deltas, finished = run(collect(engine.generate(request(max_tokens=8, seed=4, **VARIED))))
    counts = [d.usage.completion_tokens for d in deltas if d.usage is not None]
    assert counts == sorted(counts) and finished.usage.completion_tokens == 8


class InputSpy:
    """Wraps the model's forward and records each call's number of input tokens per row."""

    def __init__(self, model: Any) -> None:
        self.original = model.forward
        self.widths: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.widths.append(int(kwargs["input_ids"].shape[1]))
        return self.original(*args, **kwargs)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_chunked_prefill_matches_one_shot_prefill(engine_factory: Callable[..., Any], scheduler: str) -> None:
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 12  # ~130 prompt tokens
    one_shot = engine_factory(QWEN25, scheduler=scheduler, prefill_chunk=4096, id=f"one-shot-{scheduler}")
    chunked = engine_factory(QWEN25, scheduler=scheduler, prefill_chunk=16, id=f"chunked-{scheduler}")
    req = request(long_prompt, max_tokens=12, **GREEDY_VARIED)
    expected = run(answer(one_shot, req))
    model = chunked._loaded.model
    spy = InputSpy(model)
    model.forward = spy
    try:
        got = run(answer(chunked, req))
    finally:
        del model.forward
    assert got == expected
    prompt_tokens = expected[1].usage.prompt_tokens
    assert spy.widths[: -(12 - 1)] == [16] * (prompt_tokens // 16) + (
        [prompt_tokens % 16] if prompt_tokens % 16 else []
    )


def test_long_prompt_prefill_interleaves_with_decoding(engine_factory: Callable[..., Any]) -> None:
    """A long prompt arriving while another request streams is prefilled one chunk per step, and
    each of those steps also decodes the running stream's next token (one flat forward pass)."""
    engine = engine_factory(QWEN25, scheduler="batched", prefill_chunk=16, id="interleave-prefill")
    model = engine._loaded.model
    spy = InputSpy(model)

    async def main() -> None:
        stream = engine.generate(request("Hi", max_tokens=60, **VARIED, seed=1))
        await stream.__anext__()  # decoding has begun

        async def rest() -> None:
            async for _event in stream:
                pass

        running = asyncio.ensure_future(rest())
        model.forward = spy
        await answer(engine, request("lorem ipsum dolor " * 30, max_tokens=2, **VARIED, seed=2))
        await running

    try:
        run(main())
    finally:
        del model.forward
    chunk_steps = [w for w in spy.widths if w > 1]
    # 16 prompt tokens plus the running request's token: it got a token with every chunk.
    assert chunk_steps.count(16 + 1) >= 4
    assert max(chunk_steps) == 16 + 1  # never more than one chunk of prompt per step


def test_cancel_during_the_last_prefill_chunk_leaves_no_row_behind(
    engine_factory: Callable[..., Any],
) -> None:
    """A client that goes away while its final prefill forward runs: in batched mode the sequence has
    already joined the shared cache, and must leave it again (not keep decoding unseen)."""
    engine = engine_factory(QWEN25, scheduler="batched", max_batch_size=4, id="cancel-at-join")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        victim: dict[str, asyncio.Future[Any]] = {}
        hung_up = threading.Event()

        class HangUpWhileChoosingFirstToken:
            def allowed(self, generated: Any) -> Any:
                if len(generated) == 0:  # on the inference thread, at the end of the victim's prefill
                    loop.call_soon_threadsafe(victim["task"].cancel)
                    # The step goes on only once the client side has seen the hang-up through (an
                    # event, not a sleep); the bound is for an engine that would wait on this thread.
                    assert hung_up.wait(60)
                return None

        install_masks(
            engine, lambda req: [HangUpWhileChoosingFirstToken()] if req.request_id == "victim" else []
        )
        # The other request is decoding (its first token is out) before the victim arrives, so the
        # victim's last prefill chunk joins a running batch.
        other_stream = engine.generate(request("hello", request_id="other", max_tokens=120, temperature=0))
        assert isinstance(await other_stream.__anext__(), TextDelta)
        other = asyncio.ensure_future(collect(other_stream))
        victim["task"] = asyncio.ensure_future(
            answer(engine, request("bye", request_id="victim", max_tokens=3, temperature=0))
        )
        victim["task"].add_done_callback(lambda _task: hung_up.set())
        with contextlib.suppress(asyncio.CancelledError):
            await victim["task"]
        assert victim["task"].cancelled()
        await other
        await answer(engine, request("again", request_id="third", max_tokens=20, temperature=0))

    try:
        run(main())
    finally:
        remove_masks(engine)
    backend = engine._scheduler._backend
    # The answer reaches the consumer before the thread reaps the finished row: wait for the reap.
    deadline = time.monotonic() + 10
    while backend.rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.rows == [] and backend.pool.in_use == 0
    assert run(engine.health()).active_generations == 0


def test_a_failed_batch_rebuild_fails_the_batch_and_the_engine_goes_on(
    engine_factory: Callable[..., Any],
) -> None:
    """Out of memory while the shared cache is rebuilt (a row leaving) is nobody's forward pass: the
    running requests fail with EngineOverloaded, and the engine keeps serving."""
    engine = engine_factory(QWEN25, scheduler="batched", id="rebuild-oom")
    backend_cls = type(engine._scheduler._backend)
    original = backend_cls.remove
    calls = {"n": 0}

    def remove_once_fails(self: Any, seqs: list[Any]) -> None:
        if seqs and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        original(self, seqs)

    async def main() -> list[Any]:
        short = answer(engine, request("a", max_tokens=3, seed=1, **VARIED))
        long = answer(engine, request("b", max_tokens=60, seed=2, **VARIED))
        return list(await asyncio.gather(short, long, return_exceptions=True))

    backend_cls.remove = remove_once_fails
    try:
        short, long = run(main())
    finally:
        backend_cls.remove = original
    assert calls["n"] == 1
    assert short[1].reason == "length"  # it had its answer before the rebuild failed
    assert isinstance(long, EngineOverloaded)
    assert run(engine.health()).active_generations == 0
    _, finished = run(answer(engine, request("c", max_tokens=5, seed=3, **VARIED)))
    assert finished.usage.completion_tokens == 5 and run(engine.health()).state is EngineState.READY
