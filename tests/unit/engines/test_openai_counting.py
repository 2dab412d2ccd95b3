"""The upstream engines' token counter: entries of one registry that count with the same tokenizer
directory share one (parsing a Qwen tokenizer.json is ~0.5 s, and a front gateway may list dozens of
upstream models on one tokenizer); the count is the same as a counter of its own gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_gateway.engines.base import ChatMessage
from qwen_gateway.engines.openai.counting import TokenCounter
from qwen_gateway.engines.registry import SharedLoads, create_engine
from qwen_gateway.errors import StartupError
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
