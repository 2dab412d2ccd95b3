"""LocalEngine on the tiny Qwen checkpoints: prompts, limits, sampling, stops, streaming text.

Random weights: greedy output tends to repeat one token, so tests that need varied tokens use seeded
sampling, greedy decoding with penalties, or force tokens with a token mask (the batch bitmask).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qwen_gateway.engines.base import (
    ChatMessage,
    Engine,
    EngineState,
    SamplingParams,
    TextDelta,
    Thinking,
    ToolCall,
    ToolSpec,
)
from qwen_gateway.engines.local.sampling import GenerationDefaults, ResolvedSampling, Sampler
from qwen_gateway.engines.local.sequence import Sequence
from qwen_gateway.errors import ContextLengthExceeded, InvalidParameter
from tests.unit.engines.local_helpers import (
    QWEN3,
    QWEN25,
    Forcer,
    Recorder,
    answer,
    collect,
    install_masks,
    make_engine,
    remove_masks,
    request,
    run,
    text_of,
)

VARIED: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


@pytest.fixture(scope="module")
def qwen25(engine_factory: Callable[..., Any]) -> Any:
    return engine_factory(QWEN25)


@pytest.fixture(scope="module")
def qwen3(engine_factory: Callable[..., Any]) -> Any:
    return engine_factory(QWEN3)


@pytest.fixture(scope="module")
def tokenizer(qwen25: Any) -> Any:
    return qwen25._loaded.tokenizer


@pytest.fixture
def hook(qwen25: Any) -> Any:
    """Install token masks for every request of one test."""

    def install(*masks: Any) -> None:
        install_masks(qwen25, lambda _req: list(masks))

    yield install
    remove_masks(qwen25)


def template_ids(tok: Any, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)
    return list(out["input_ids"] if not isinstance(out, list) else out)


# -- the Engine contract -------------------------------------------------------------------------------


def test_engine_protocol_capabilities_and_health(qwen25: Any, qwen3: Any) -> None:
    engine: Any = qwen25  # keep Any: isinstance would narrow it to the protocol
    assert isinstance(engine, Engine)
    assert qwen25.name == "local"
    assert qwen25.capabilities.max_context == 32768 and qwen25.capabilities.max_output is None
    assert qwen25.capabilities.tools and not qwen25.capabilities.reasoning
    assert qwen3.capabilities.max_context == 40960
    assert qwen3.capabilities.tools and qwen3.capabilities.reasoning
    health = run(qwen25.health())
    assert health.state is EngineState.READY and health.active_generations == 0
    assert qwen25.scheduler_kind == "batched"  # the measured default


# -- prompts ----------------------------------------------------------------------------------------------


def test_prompt_tokens_equal_the_chat_template(qwen25: Any, tokenizer: Any) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello! 你好"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Tell me a story about the sea."},
    ]
    req = request(
        messages=tuple(ChatMessage(m["role"], m["content"]) for m in messages), max_tokens=3, **VARIED
    )
    _, finished = run(answer(qwen25, req))
    assert finished.usage.prompt_tokens == len(template_ids(tokenizer, messages))


def test_qwen3_thinking_switch_reaches_the_template(qwen3: Any) -> None:
    tok = qwen3._loaded.tokenizer
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    for thinking in (True, False):
        req = request(msgs[0]["content"], max_tokens=2, thinking=Thinking(enabled=thinking, budget=4))
        _, finished = run(answer(qwen3, req))
        assert finished.usage.prompt_tokens == len(template_ids(tok, msgs, enable_thinking=thinking))
    text = qwen3._renderer.render_text(request(msgs[0]["content"], thinking=Thinking(enabled=False)))
    assert text.endswith("<think>\n\n</think>\n\n")


def test_tools_and_tool_calls_render_like_openai_dicts(qwen25: Any, tokenizer: Any) -> None:
    tool = ToolSpec("get_weather", "Weather for a city", {"type": "object", "properties": {}})
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    msgs = (
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", "sunny", tool_call_id="call_1"),
    )
    req = request(messages=msgs, tools=(tool,), max_tokens=2)
    text = qwen25._renderer.render_text(req)
    assert '"name": "get_weather"' in text and '"description": "Weather for a city"' in text
    # Arguments are passed as a dict, so the template writes them once, not as an escaped string.
    assert '"arguments": {"city": "Paris"}' in text and "<tool_response>\nsunny\n</tool_response>" in text
    expected = template_ids(
        tokenizer,
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": json.loads(call.arguments)},
                    }
                ],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        ],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": dict(tool.parameters),
                },
            }
        ],
    )
    _, finished = run(answer(qwen25, req))
    assert finished.usage.prompt_tokens == len(expected)


def test_partial_mode_continues_the_assistant_text(qwen25: Any, tokenizer: Any) -> None:
    msgs = (ChatMessage("user", "Count to five."), ChatMessage("assistant", "One, two,", partial=True))
    req = request(messages=msgs, max_tokens=2)
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count to five."}], add_generation_prompt=True, tokenize=False
    )
    assert qwen25._renderer.render_text(req) == head + "One, two,"
    _, finished = run(answer(qwen25, req))
    expected = tokenizer(head + "One, two,", add_special_tokens=False)["input_ids"]
    assert finished.usage.prompt_tokens == len(expected)


def test_template_errors_are_invalid_parameter() -> None:
    import threading

    import jinja2

    from qwen_gateway.engines.local.prompt import PromptRenderer

    class RefusingTokenizer:
        chat_template = "{{ raise_exception('No user query found in messages.') }}"

        def apply_chat_template(self, *args: Any, **kwargs: Any) -> str:
            raise jinja2.exceptions.TemplateError("No user query found in messages.")

    renderer = PromptRenderer(RefusingTokenizer(), threading.Lock())
    with pytest.raises(InvalidParameter) as info:
        renderer.render(request())
    assert info.value.param == "messages" and "No user query found" in info.value.message


# -- limits -----------------------------------------------------------------------------------------------


def test_max_tokens_gives_length_with_exactly_that_many_tokens(qwen25: Any) -> None:
    for n in (1, 7):
        deltas, finished = run(collect(qwen25.generate(request(max_tokens=n, seed=3, **VARIED))))
        assert finished.reason == "length" and finished.usage.completion_tokens == n
        # Deltas carry the cumulative usage so far.
        assert all(d.usage is not None and d.usage.completion_tokens <= n for d in deltas)


def test_context_length_exceeded_raises_before_any_event(
    qwen25: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt_len = run(answer(qwen25, request(max_tokens=1)))[1].usage.prompt_tokens
    caps = qwen25.capabilities
    monkeypatch.setattr(qwen25, "_capabilities", dataclasses.replace(caps, max_context=prompt_len))
    stream = qwen25.generate(request(max_tokens=1))
    with pytest.raises(ContextLengthExceeded) as info:
        run(stream.__anext__())
    assert info.value.message == f"Range of input length should be [1, {prompt_len - 1}]"
    assert info.value.param == "messages"
    # Fits, but not with max_tokens: the answer is cut at the context limit.
    monkeypatch.setattr(qwen25, "_capabilities", dataclasses.replace(caps, max_context=prompt_len + 3))
    _, finished = run(answer(qwen25, request(max_tokens=50, seed=1, **VARIED)))
    assert finished.reason == "length" and finished.usage.completion_tokens == 3
    assert run(qwen25.health()).active_generations == 0


# -- sampling ---------------------------------------------------------------------------------------------


def test_seed_determinism_alone_and_beside_other_requests(qwen25: Any) -> None:
    def one(seed: int) -> str:
        return run(answer(qwen25, request(max_tokens=12, seed=seed, **VARIED)))[0]

    a, b = one(42), one(42)
    assert a == b and len(a) > 0
    others = [one(s) for s in (43, 44, 45)]
    assert sum(o != a for o in others) >= 2  # different seeds: (almost always) different text

    async def crowd() -> list[str]:
        reqs = [request(max_tokens=12, seed=42, **VARIED)] + [
            request(f"Other prompt {i}", max_tokens=20, seed=i, **VARIED) for i in range(3)
        ]
        results = await asyncio.gather(*(answer(qwen25, r) for r in reqs))
        return [text for text, _ in results]

    assert run(crowd())[0] == a


def test_unseeded_sampling_varies(qwen25: Any) -> None:
    texts = {run(answer(qwen25, request(max_tokens=8, **VARIED)))[0] for _ in range(3)}
    assert len(texts) > 1


def test_greedy_is_deterministic(qwen25: Any) -> None:
    outs = {run(answer(qwen25, request(max_tokens=10, temperature=0.0)))[0] for _ in range(2)}
    assert len(outs) == 1


# -- stops --------------------------------------------------------------------------------------------------


def test_stop_string_is_excluded_and_finishes_with_stop(qwen25: Any) -> None:
    base, finished = run(answer(qwen25, request(max_tokens=30, seed=3, **VARIED)))
    assert finished.reason == "length" and len(base) > 6
    stop = base[len(base) // 2 : len(base) // 2 + 2]
    deltas, cut = run(collect(qwen25.generate(request(max_tokens=30, seed=3, stop=(stop,), **VARIED))))
    text = text_of(deltas)
    assert cut.reason == "stop"
    assert text == base[: base.index(stop)]
    assert all(stop not in d.text for d in deltas)
    assert cut.usage.completion_tokens < 30


def test_stop_token_ids_end_without_their_text(qwen25: Any, tokenizer: Any, hook: Any) -> None:
    recorder = Recorder()
    hook(recorder)
    run(answer(qwen25, request(max_tokens=21, seed=5, **VARIED)))
    ids = recorder.seen[:20]
    assert len(ids) == 20
    # The first place where the pair (ids[8], ids[9]) occurs.
    pair = (ids[8], ids[9])
    end = next(i + 2 for i in range(19) if (ids[i], ids[i + 1]) == pair)
    for stops, tokens in (((pair,), end), (((ids[4],),), ids.index(ids[4]) + 1)):
        text, finished = run(answer(qwen25, request(max_tokens=21, seed=5, stop_token_ids=stops, **VARIED)))
        assert finished.reason == "stop" and finished.usage.completion_tokens == tokens
        assert text == tokenizer.decode(ids[: tokens - len(stops[0])])


def test_eos_is_counted_but_never_emitted(qwen25: Any, tokenizer: Any, hook: Any) -> None:
    hello = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    for eos in (151645, 151643):  # <|im_end|>, <|endoftext|>
        hook(Forcer([*hello, eos]))
        text, finished = run(answer(qwen25, request(max_tokens=20, temperature=0.0)))
        assert text == "Hello" and finished.reason == "stop"
        assert finished.usage.completion_tokens == len(hello) + 1


# -- streaming text ---------------------------------------------------------------------------------------------


def test_multibyte_deltas_concatenate_to_the_full_text(qwen25: Any, tokenizer: Any, hook: Any) -> None:
    target = "你好，世界！龘𝄞🙂 naïve"
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    hook(Forcer(ids))
    deltas, finished = run(collect(qwen25.generate(request(max_tokens=len(ids), temperature=0.0))))
    assert text_of(deltas) == target and finished.usage.completion_tokens == len(ids)
    assert not any("\ufffd" in d.text for d in deltas)
    assert len(deltas) > 3  # streamed, not one lump at the end


def test_random_tokens_concatenate_to_the_decoded_answer(qwen25: Any, tokenizer: Any, hook: Any) -> None:
    recorder = Recorder()
    hook(recorder)
    deltas, finished = run(collect(qwen25.generate(request("写一首诗", max_tokens=40, seed=11, **VARIED))))
    ids = list(recorder.seen)
    assert len(ids) == finished.usage.completion_tokens == 40
    assert text_of(deltas) == tokenizer.decode(ids)


def test_tiny_temperatures_decode_greedily(qwen25: Any) -> None:
    # Dividing float32 logits by 1e-30 overflows; such temperatures must behave as temperature 0.
    greedy = run(answer(qwen25, request(max_tokens=8, temperature=0.0)))[0]
    for t in (1e-6, 1e-30, 1e-300):
        assert run(answer(qwen25, request(max_tokens=8, temperature=t, seed=1)))[0] == greedy


def test_a_generation_closed_early_reports_its_final_usage(engine_factory: Callable[..., Any]) -> None:
    engine = engine_factory(QWEN25, id="cancel-report")

    async def main() -> tuple[Any, Any, Any, Any]:
        stream = engine.generate(request(max_tokens=2000, request_id="early", temperature=1.0, seed=3))
        seen = None
        async for event in stream:
            if isinstance(event, TextDelta) and event.usage is not None:
                seen = event.usage
                if seen.completion_tokens >= 3:
                    break
        await stream.aclose()
        final = await engine.cancelled_usage("early")
        return seen, final, await engine.cancelled_usage("early"), await engine.cancelled_usage("never")

    seen, final, again, unknown = run(main())
    assert final is not None and final.prompt_tokens == seen.prompt_tokens
    # Every token the engine generated, read or not; it stopped soon after the close.
    assert seen.completion_tokens <= final.completion_tokens < 2000
    assert again is None and unknown is None  # each id is answered once


def test_a_released_sequence_drops_its_callbacks_so_refcounting_frees_their_owners() -> None:
    """The scheduler's release counter and the engine's stop callback refer back to their owners; kept
    on a finished sequence they made cycles that held the model's weights until a full collection."""

    class Owner:
        def count(self) -> None:
            self.counted = True

    owner, stops = Owner(), []
    seq = Sequence(
        request_id="r",
        prompt_ids=[1],
        max_new_tokens=4,
        sampler=Sampler(ResolvedSampling.resolve(SamplingParams(max_tokens=4), GenerationDefaults()), [1]),
        eos_ids=frozenset(),
        stop_token_ids=(),
        emit=lambda _item: None,
    )
    seq.on_release = owner.count
    seq.when_stopped(lambda: stops.append(seq))  # a closure over the sequence: a cycle until dropped
    gone = weakref.ref(owner)
    automatic = gc.isenabled()
    gc.disable()
    try:
        seq.release()
        assert owner.counted and stops == [seq]
        del owner
        assert gone() is None  # freed by its reference count alone: no cycle through the sequence
        seq.release()  # a second release calls nothing again
        assert stops == [seq]
    finally:
        if automatic:
            gc.enable()


def test_a_closed_engine_frees_its_weights(tmp_path: Path) -> None:
    engine = make_engine(QWEN25, tmp_path)
    run(engine.start())
    weights = weakref.ref(engine._loaded.model)

    async def three() -> None:
        await asyncio.gather(
            *(answer(engine, request(max_tokens=4, seed=i, request_id=f"w{i}")) for i in range(3))
        )

    run(three())
    run(engine.aclose())
    assert weights() is None
