"""The upstream engines' token counter: entries of one registry that count with the same tokenizer
directory share one (parsing a Qwen tokenizer.json is ~0.5 s, and a front gateway may list dozens of
upstream models on one tokenizer); the count is the same as a counter of its own gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_gateway.engines.base import ChatMessage, ToolSpec
from qwen_gateway.engines.openai.counting import TokenCounter, prompt_bound
from qwen_gateway.engines.registry import SharedLoads, create_engine
from qwen_gateway.errors import ContextLengthExceeded, StartupError
from qwen_gateway.settings import ModelConfig, Settings
from tests.support import MODELS

QWEN25 = MODELS / "tiny-qwen2.5"


def _engine(model_id: str, tokenizer: str | None, settings: Settings, shared: SharedLoads | None) -> object:
    config = ModelConfig(id=model_id, engine="openai", base_url="http://127.0.0.1:9/v1", tokenizer=tokenizer)
    return create_engine(config, settings, shared=shared)


def _counter(engine: object) -> TokenCounter:
    counter = engine._counter  # type: ignore[attr-defined]
    assert isinstance(counter, TokenCounter)
    return counter


def test_entries_on_one_tokenizer_share_its_counter(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    shared = SharedLoads()
    # The same directory spelt two ways, and a second one.
    first = _counter(_engine("a", str(QWEN25), settings, shared))
    second = _counter(_engine("b", str(QWEN25 / ".." / QWEN25.name), settings, shared))
    other = _counter(_engine("c", str(MODELS / "tiny-qwen3"), settings, shared))
    none = _counter(_engine("d", None, settings, shared))
    alone = _counter(_engine("e", str(QWEN25), settings, None))
    assert first is second
    assert other is not first and alone is not first
    assert first.exact and alone.exact and not none.exact
    messages = [ChatMessage(role="user", content="How many tokens is this prompt, counted twice?")]
    assert first.prompt(messages, ()) == alone.prompt(messages, ()) > 10
    assert first.text(["Hello", ", world"]) == alone.text(["Hello, world"]) > 0


def test_a_bad_tokenizer_directory_fails_every_entry_that_names_it(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    shared = SharedLoads()
    for model_id in ("a", "b"):
        with pytest.raises(StartupError, match=r"cannot read tokenizer\.json"):
            _engine(model_id, str(tmp_path / "missing"), settings, shared)


def test_a_prompt_the_context_cannot_hold_is_refused_after_counting_about_a_context_of_it() -> None:
    counter = TokenCounter(str(QWEN25))
    short = [ChatMessage(role="user", content="hello there")]
    count = counter.prompt(short, ())
    assert counter.prompt(short, (), limit=count + 1) == count
    with pytest.raises(ContextLengthExceeded, match=r"Range of input length should be \[1, 4\]"):
        counter.prompt(short, (), limit=5)
    # Megabytes of text: refused by the pieces counted first, not by tokenizing it all.
    huge = [ChatMessage(role="user", content="word " * 2_000_000)]
    calls: list[int] = []
    tokenizer = counter._tokenizer
    real = tokenizer.encode_batch

    class Spy:
        def encode_batch(self, pieces: list[str], **kw: object) -> object:
            calls.append(sum(map(len, pieces)))
            return real(pieces, **kw)

        def __getattr__(self, name: str) -> object:
            return getattr(tokenizer, name)

    counter._tokenizer = Spy()
    try:
        with pytest.raises(ContextLengthExceeded, match=r"\[1, 8191\]"):
            counter.prompt(huge, (), limit=8192)
    finally:
        counter._tokenizer = tokenizer
    assert sum(calls) < 1_000_000  # of 10 MB


def test_without_a_tokenizer_the_estimate_never_refuses() -> None:
    counter = TokenCounter(None)
    messages = [ChatMessage(role="user", content="word " * 1000)]
    assert counter.prompt(messages, (), limit=10) > 10


def test_the_bound_is_at_least_the_count() -> None:
    counter = TokenCounter(str(MODELS / "tiny-qwen3"))
    tools = [ToolSpec(name="get_weather", description="Weather.", parameters={"type": "object"})]
    for text in ("hi", "naïve café " * 50, "天气怎么样？" * 100, "x" * 70_000):
        messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content=text)]
        assert prompt_bound(messages, tools) >= counter.prompt(messages, tools)


def test_a_conversation_the_template_refuses_is_estimated_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((QWEN25 / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('No user query found in messages.') }}")
    counter = TokenCounter(str(tmp_path))
    messages = [ChatMessage(role="user", content="word " * 100)]
    assert counter.prompt(messages, (), limit=10) == TokenCounter(None).prompt(messages, ())


def test_a_tool_conversation_counts_as_the_local_engine_renders_it() -> None:
    """Tool calls, tool results and tool descriptions are part of what the upstream's template renders:
    the counter hands the template the same conversation the local engine does (template_messages.py),
    so with the same checkpoint both count the same tokens."""
    import threading

    from transformers import AutoTokenizer

    from qwen_gateway.engines.base import GenerationRequest, SamplingParams, ToolCall
    from qwen_gateway.engines.local.prompt import PromptRenderer

    tool = ToolSpec(
        "get_weather",
        "The weather in a city, today.",
        {"type": "object", "properties": {"city": {"type": "string"}}},
    )
    messages = (
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(
            role="assistant", content="", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)
        ),
        ChatMessage(role="tool", content='{"sky": "clear", "c": 21}', tool_call_id="call_1"),
    )
    counter = TokenCounter(str(QWEN25))
    renderer = PromptRenderer(AutoTokenizer.from_pretrained(QWEN25), threading.Lock())
    request = GenerationRequest(
        request_id="r", model="m", messages=messages, sampling=SamplingParams(max_tokens=8), tools=(tool,)
    )
    local = len(renderer.render(request))
    assert counter.prompt(messages, [tool]) == local
    # Without the tool call and its result the count is smaller: they were counted, not dropped.
    assert counter.prompt(messages[:1], [tool]) < local
